"""`manifest.json`: what an export directory holds, read by the runtime without torch.

An export directory is self-contained: the graphs, this manifest, and the preprocessing files
(`preprocess.json`, `tokenizer.json`, `guide_tokenizer.json`) that `tgedge.preprocess.Preprocessor` reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tgedge import __version__
from tgedge.contract import ALL_STAGES, CACHE_MODES, StageContract, TensorMeta
from tgedge.errors import TgedgeError
from tgedge.fileio import fingerprint, inside, read_input, sha256_files

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
GRAPHS = ALL_STAGES  # one graph per stage


INT_MAX = 2 ** 31 - 1  # sizes and positions: beyond int32 a manifest is corrupt, not large
GRAPH_KEYS = {"name": "str", "file": "str", "precision": "str", "inputs": "tensors", "outputs": "tensors",
              "sha256": "str?", "external_data": "str?", "fingerprint": "str?", "shared_data": "strs"}


def _int(value, lo: int, hi: int = INT_MAX) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (bool, type(None), str, list, dict)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _tensor_problems(tensors, key: str) -> list[str]:
    if not isinstance(tensors, list):
        return [f"{key} must be a list of tensors (got {_show(tensors)})"]
    out = []
    for i, t in enumerate(tensors):
        where = f"{key}[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("dtype"), str):
            out.append(f"{where} must be an object with string name and dtype (got {_show(t)})")
        elif not isinstance(t.get("shape"), list) or not all(isinstance(x, str) or _int(x, 0) for x in t["shape"]):
            out.append(f"{where}.shape must be a list of sizes >= 0 or dim names (got {_show(t.get('shape'))})")
    return out


def _graph_problems(name: str, g) -> list[str]:
    from tgedge.precision import PRECISIONS

    key = f"graphs.{name}"
    if not isinstance(g, dict):
        return [f"{key} must be an object (got {_show(g)})"]
    out = [f"{key}: unknown key(s) {', '.join(sorted(set(g) - set(GRAPH_KEYS)))}"] if set(g) - set(GRAPH_KEYS) else []
    for field, kind in GRAPH_KEYS.items():
        value = g.get(field)
        if kind == "tensors":
            out += _tensor_problems(value, f"{key}.{field}")
        elif kind == "strs":
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                out.append(f"{key}.{field} must be a list of file names (got {_show(value)})")
        elif not isinstance(value, str) and not (kind == "str?" and value is None):
            out.append(f"{key}.{field} must be a string (got {_show(value)})")
    if isinstance(g.get("precision"), str) and g["precision"] not in PRECISIONS:
        out.append(f"{key}.precision {g['precision']!r} is not one of {', '.join(PRECISIONS)}")
    return out


def manifest_problems(d: dict) -> list[str]:
    """What is wrong with a manifest's own fields (types, ranges), every problem; empty when none. Checked before
    anything reads them: a string where a number belongs would surface later as a traceback far from the file."""
    out = [f"{k} missing" for k in ("graphs", "dims", "max_context", "opset", "model") if k not in d]
    for key, lo, hi in (("max_context", 1, INT_MAX), ("opset", 1, 1000)):
        if key in d and not _int(d[key], lo, hi):
            out.append(f"{key} must be an integer in [{lo}, {hi}] (got {_show(d[key])})")
    for key in ("graphs", "dims", "model", "files", "file_sha256", "source", "reference", "quantization", "engines",
                "kv_cache"):
        if key in d and not isinstance(d[key], dict) and not (key == "kv_cache" and d[key] is None):
            out.append(f"{key} must be an object (got {_show(d[key])})")
    decoder = d["model"].get("decoder") if isinstance(d.get("model"), dict) else None
    positions = decoder.get("max_position_embeddings") if isinstance(decoder, dict) else None
    if _int(d.get("max_context"), 1) and _int(positions, 1) and d["max_context"] > positions:
        # past the positions the model was trained on (and its rotary tables cover): silently wrong answers
        out.append(f"max_context {d['max_context']} is above the model's positions "
                   f"(model.decoder.max_position_embeddings {positions})")
    vocab = decoder.get("vocab_size") if isinstance(decoder, dict) else None
    if _int(vocab, 1):  # an id beyond the vocabulary never comes out of the decoder: an EOS there never stops it
        model = d["model"]
        eos = model.get("eos_token_id")
        for key, ids in (("eos_token_id", eos if isinstance(eos, list) else [eos]),
                         ("bos_token_id", [model.get("bos_token_id")]),
                         ("image_token_index", [model.get("image_token_index")])):
            bad = [i for i in ids if i is not None and not _int(i, 0, vocab - 1)]
            if bad or (key == "eos_token_id" and not ids):
                out.append(f"model.{key} must be token ids in [0, {vocab - 1}] (model.decoder.vocab_size {vocab}; "
                           f"got {_show(model.get(key))})")
    if isinstance(d.get("graphs"), dict):
        for name, g in d["graphs"].items():
            out += _graph_problems(name, g)
        decoder_graph = d["graphs"].get("decoder")
        outputs = decoder_graph.get("outputs") if isinstance(decoder_graph, dict) else None
        logits = [o.get("shape") for o in outputs if isinstance(o, dict) and o.get("name") == "logits"] \
            if isinstance(outputs, list) else []
        if _int(vocab, 1) and logits and isinstance(logits[0], list) and logits[0] and _int(logits[0][-1], 1) \
                and logits[0][-1] != vocab:  # the decoder's own logits say how large the vocabulary is
            out.append(f"model.decoder.vocab_size {vocab} is not the decoder's logits width "
                       f"(graphs.decoder.outputs logits {_show(logits[0])})")
    if isinstance(d.get("dims"), dict):
        for name, dim in d["dims"].items():
            if not isinstance(dim, dict) or set(dim) != {"min", "opt", "max"} \
                    or not all(_int(dim[k], 0) for k in ("min", "opt", "max")):
                out.append(f"dims.{name} must be {{\"min\", \"opt\", \"max\"}} integers >= 0 (got {_show(dim)})")
            elif not dim["min"] <= dim["opt"] <= dim["max"]:
                out.append(f"dims.{name} must have min <= opt <= max (got {_show(dim)})")
    if isinstance(d.get("files"), dict):
        out += [f"files.{k} must be a file name (got {_show(v)})" for k, v in d["files"].items() if not isinstance(v, str)]
    if isinstance(d.get("file_sha256"), dict):
        out += [f"file_sha256.{k} must be a sha256 string or null (got {_show(v)})"
                for k, v in d["file_sha256"].items() if not isinstance(v, (str, type(None)))]
    if isinstance(d.get("engines"), dict):
        out += [f"engines.{k} must be an object with a file name (got {_show(v)})" for k, v in d["engines"].items()
                if not isinstance(v, dict) or not isinstance(v.get("file"), str)]
    return out


def is_export(path: str | Path) -> bool:
    """Whether `path` is an export (or engine) directory: it holds a manifest. The one test of it (a checkpoint runs
    on torch, an export on a runtime backend); `Manifest.load` then checks the rest."""
    return (Path(path) / MANIFEST).exists()


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def io_differences(listed: list[TensorMeta], actual: list[TensorMeta], full_shape: bool) -> list[str]:
    """How a graph's actual inputs (or outputs) differ from the ones a manifest lists; empty when they agree.

    `full_shape=False` compares names, dtypes and ranks (what the runtime needs to feed the graph);
    `full_shape=True` compares every dim too (what `tgedge inspect` reports)."""
    def key(t: TensorMeta):
        return (t.name, t.dtype, tuple(t.shape) if full_shape else len(t.shape))

    want, got = [key(t) for t in listed], [key(t) for t in actual]
    if want == got:
        return []
    shape = "shape" if full_shape else "rank"
    diff = [f"{n} {d} {shape} {s}" for n, d, s in sorted(set(want) ^ set(got), key=str)]
    return diff or ["same tensors in another order"]


def check_graph_io(manifest: "Manifest", graph: str, inputs: list[TensorMeta], outputs: list[TensorMeta]) -> None:
    """A graph file's own inputs/outputs must be the ones the manifest lists (names, dtypes, ranks): one line
    naming the file and the tensors that differ (`run` checks its sessions, `tgedge triton` the files)."""
    entry = manifest.graphs[graph]
    for kind, listed, actual in (("inputs", entry.inputs, inputs), ("outputs", entry.outputs, outputs)):
        diff = io_differences(listed, actual, full_shape=False)
        if diff:
            raise TgedgeError(f"{manifest.graph_path(graph)}: graph {kind} do not match manifest.json "
                              f"(differing: {', '.join(diff)})")


@dataclass
class GraphEntry:
    name: str
    file: str
    precision: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    sha256: str = ""
    external_data: str | None = None
    fingerprint: str = ""  # size + first/last MiB of each file: the cheap identity `run` checks on every start
    shared_data: list[str] = field(default_factory=list)  # other graphs' weight files it reads (a tied table)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GraphEntry":
        d = dict(d)
        d["inputs"] = [TensorMeta.from_dict(t) for t in d["inputs"]]
        d["outputs"] = [TensorMeta.from_dict(t) for t in d["outputs"]]
        return cls(**d)


@dataclass
class Manifest:
    graphs: dict[str, GraphEntry]
    dims: dict[str, dict[str, int]]  # symbolic dim -> {"min", "opt", "max"} (TensorRT optimisation profiles)
    max_context: int
    opset: int
    model: dict  # the model config (tgedge.config.ModelConfig.to_dict())
    source: dict = field(default_factory=dict)  # {"checkpoint": path as given, "sha256": weights hash}
    reference: dict = field(default_factory=dict)  # per graph: fixed input and reference output checksums
    files: dict = field(default_factory=dict)  # preprocessing files copied in
    file_sha256: dict = field(default_factory=dict)  # files key -> sha256 of that file, checked like the graphs
    quantization: dict = field(default_factory=dict)  # tgedge quantize: precision, method, per-graph coverage
    engines: dict = field(default_factory=dict)  # tgedge build: graph -> engine file and build metadata
    contract: StageContract | None = None  # derived from `model` at load; saved as fusion_family/stages/kv_cache
    tgedge_version: str = __version__
    manifest_version: int = MANIFEST_VERSION
    directory: Path | None = None

    def to_dict(self) -> dict:
        return {"manifest_version": self.manifest_version, "tgedge_version": self.tgedge_version,
                "opset": self.opset, "max_context": self.max_context,
                "graphs": {k: g.to_dict() for k, g in self.graphs.items()}, "dims": self.dims,
                "files": self.files, "file_sha256": self.file_sha256, "source": self.source,
                "reference": self.reference,
                "quantization": self.quantization, "engines": self.engines,
                **(self.contract.to_dict() if self.contract else {}), "model": self.model}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        """Read and check an export directory: version, graph files present, preprocessing files present."""
        from tgedge.config import read_config_json

        directory = Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise TgedgeError(f"{directory}: export directory not found")
        if not path.exists():
            raise TgedgeError(f"{directory}: no {MANIFEST} (not a tgedge export directory; make one with tgedge export)")
        d = read_config_json(path)
        version, written_by = d.get("manifest_version"), d.get("tgedge_version", "?")
        if version != MANIFEST_VERSION or _major_minor(str(written_by)) != _major_minor(__version__):
            raise TgedgeError(f"{path}: written by tgedge {written_by} (manifest version {version}); this is tgedge "
                              f"{__version__} (manifest version {MANIFEST_VERSION}): export the model again")
        problems = manifest_problems(d)
        if problems:
            raise TgedgeError(f"{path}: {'; '.join(problems)}")
        try:
            m = cls(graphs={k: GraphEntry.from_dict(g) for k, g in d["graphs"].items()}, dims=d["dims"],
                    max_context=d["max_context"], opset=d["opset"], model=d["model"], source=d.get("source", {}),
                    reference=d.get("reference", {}), files=d.get("files", {}),
                    file_sha256=d.get("file_sha256", {}),
                    quantization=d.get("quantization", {}), engines=d.get("engines", {}),
                    tgedge_version=written_by,
                    manifest_version=version, directory=directory)
            m.contract = load_contract(d)
        except (KeyError, TypeError, ValueError) as e:
            raise TgedgeError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
        unknown = sorted(set(m.graphs) - set(GRAPHS))
        if unknown:
            raise TgedgeError(f"{path}: unknown graph(s) {', '.join(unknown)} (known: {', '.join(GRAPHS)})")
        missing = [s for s in m.contract.stage_names if s not in m.graphs]
        if missing:
            raise TgedgeError(f"{path}: no {missing[0]!r} graph listed (a {m.contract.family} model's stages: "
                              f"{', '.join(m.contract.stage_names)})")
        for g in m.graphs.values():
            if not inside(directory, g.file, f"{path} graphs.{g.name}.file").exists():
                raise TgedgeError(f"{directory}: graph {g.name!r} is missing ({g.file} not found)")
            if g.external_data and not inside(directory, g.external_data,
                                              f"{path} graphs.{g.name}.external_data").exists():
                raise TgedgeError(f"{directory}: graph {g.name!r} is missing its weights ({g.external_data} not found)")
        for key, f in m.files.items():
            if not inside(directory, f, f"{path} files.{key}").exists():
                raise TgedgeError(f"{directory}: {f} is missing (listed in {MANIFEST})")
        return m

    def engine_batch(self, graph: str) -> int:
        """Sequences (images) the graph's TensorRT engine takes per call: its `tgedge build --max-batch` (1 for
        engines built before it, and for a graph without an engine)."""
        return int(self.engines.get(graph, {}).get("max_batch", 1))

    def listed_files(self, engines: bool = True) -> list[str]:
        """Every file this manifest names: itself, preprocessing, graphs, their own and shared weights, calibration
        and (with `engines`) TensorRT engines: what a copy of the directory must carry, and nothing else of it."""
        names = [MANIFEST, *self.files.values()]
        for g in self.graphs.values():
            names += [g.file] + ([g.external_data] if g.external_data else []) + list(g.shared_data)
        if self.quantization.get("calibration"):
            names.append(self.quantization["calibration"])
        if engines:
            names += [e["file"] for e in self.engines.values()]
        return list(dict.fromkeys(names))

    def graph_files(self, name: str) -> list[Path]:
        """A graph's files: the graph and its external weights, if any."""
        entry = self.graphs[name]
        where = f"{self.directory}/{MANIFEST} graphs.{name}"
        weights = [inside(self.directory, entry.external_data, f"{where}.external_data")] if entry.external_data else []
        return [self.graph_path(name)] + weights + [inside(self.directory, f, f"{where}.shared_data")
                                                    for f in entry.shared_data]

    def verify(self, name: str, full: bool) -> None:
        """The graph's files are the ones this manifest describes: all bytes (sha256, `full`) or a fingerprint."""
        entry, files = self.graphs[name], self.graph_files(name)
        kind, expected = ("sha256", entry.sha256) if full else ("fingerprint", entry.fingerprint)
        if not expected:  # null or missing: not checkable, and not to be passed unchecked
            raise TgedgeError(f"{self.directory}: graph {name!r} ({entry.file}) has no {kind} in {MANIFEST}, so it "
                              "cannot be checked: export again, or pass --no-verify")
        differs = (sha256_files(files) if full else graph_fingerprint(files)) != expected
        if differs:
            raise TgedgeError(f"{self.directory}: graph {name!r} ({entry.file}) is not the one {MANIFEST} describes "
                              f"({kind} differs): it changed after export; export again, or pass --no-verify")

    def file_problems(self) -> list[str]:
        """How the preprocessing files (`preprocess.json`, tokenizers) differ from the exported ones (an edited image
        size or mean would answer silently wrong); empty when none. Small files: their full sha256."""
        out = []
        for key, name in self.files.items():
            expected = self.file_sha256.get(key)
            if not expected:
                out.append(f"{name} has no sha256 in {MANIFEST} (file_sha256.{key}), so it cannot be checked")
            elif file_sha256(inside(self.directory, name, f"{self.directory}/{MANIFEST} files.{key}")) != expected:
                out.append(f"{name} is not the one {MANIFEST} describes (sha256 differs): it changed after export")
        return out

    def verify_files(self) -> None:
        problems = self.file_problems()
        if problems:
            raise TgedgeError(f"{self.directory}: {'; '.join(problems)}; export again, or pass --no-verify")

    def graph_path(self, name: str) -> Path:
        return inside(self.directory, self.graphs[name].file, f"{self.directory}/{MANIFEST} graphs.{name}.file")



def file_sha256(path: Path) -> str:
    return hashlib.sha256(read_input(path, "preprocessing file")).hexdigest()  # a FIFO would block: refused first


def graph_fingerprint(files: list[Path]) -> str:
    return ",".join(fingerprint(f) for f in files)


def load_contract(d: dict) -> StageContract:
    """The stage contract of a manifest's model config; where the manifest records one (tgedge >= 0.1 exports
    record `fusion_family`, `stages`, `kv_cache`), it must be the one the config gives."""
    saved_cache = d.get("kv_cache") or {}
    mode = saved_cache.get("mode", "growing")
    if mode not in CACHE_MODES:
        raise TgedgeError(f"{MANIFEST}: kv_cache mode {mode!r} is not one this tgedge runs ({', '.join(CACHE_MODES)}): "
                          "export the model again with this tgedge")
    contract = StageContract.from_config(d["model"], d["max_context"], mode, d["dims"],
                                         saved_cache.get("dtype", "float32"),
                                         saved_cache.get("row_lengths", mode == "static"))
    saved = {k: d[k] for k in ("fusion_family", "stages", "kv_cache") if k in d}
    derived = contract.to_dict()
    if "row_lengths" not in saved_cache:  # written before the key: its graph is what the mode's default says
        derived["kv_cache"].pop("row_lengths", None)
    differing = [k for k, v in saved.items() if v != derived[k]]
    if differing:
        raise TgedgeError(f"manifest.json: {', '.join(differing)} differ from what its model config gives "
                          f"({'; '.join(f'{k}: {derived[k]}' for k in differing)})")
    return contract
