"""`tgedge triton`: a Triton Inference Server model repository from an export or engine directory.

    REPO/
      tgedge/config.pbtxt        the entry model: Python backend, decoupled (streams the answer), image bytes +
      tgedge/1/model.py          question in; it runs tgedge's Pipeline, the decode loop and its KV cache in one
      tgedge/1/export/           instance, over the export (or engine) directory copied here whole
      text_guide/config.pbtxt    one model per stage of the stage contract (names, dtypes, dims from it), the
      text_guide/1/model.onnx    graph or engine under 1/; text_guide and vision batch dynamically: the entry
      vision/ fusion/ ...        model calls them through BLS, so Triton batches them across requests

`--backend python` serves each stage with tgedge's own ONNX Runtime runner inside Triton's Python backend (what
the `tritonserver` of nvidia-pytriton runs); `onnxruntime` and `tensorrt` write the configs a full Triton
container loads (platform onnxruntime_onnx / tensorrt_plan). Stage graphs are hard links to the entry model's
copy (one copy on disk). Configs are written through Triton's own schema (tritonclient's model_config_pb2).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tgedge.contract import BATCH, VIEWS, StageContract, TensorMeta
from tgedge.errors import TgedgeError, absent
from tgedge.fileio import atomic_dir, inside, read_marker, regular_file
from tgedge.runtime.manifest import Manifest, TensorMeta, check_graph_io
from tgedge.serving.protocol import (CONVERSATIONS, ENTRY_MODEL, REQUEST, RESPONSE, TRITON_TYPES, Field,
                                     require_tritonclient)

BACKENDS = ("python", "onnxruntime", "tensorrt")
# Stages the entry model calls through BLS by default: the image side, which Triton batches across requests.
BLS_STAGES = ("text_guide", "vision")
# The tgedge runtime backend the entry model runs its own stages (fusion, embed, decoder) on, per repository kind.
RUNTIME_BACKEND = {"python": "onnxruntime", "onnxruntime": "onnxruntime-cuda", "tensorrt": "tensorrt"}
EXPORT_SUBDIR = "export"

MODEL_PY = '''"""Written by `tgedge triton`: Triton's Python backend runs tgedge's own code ({module}).

The server's Python needs tgedge and its runtime (pip install "tgedge[serve]"). `tgedge serve` names the
environment it runs from in TGEDGE_SITE (site directories, searched first); without it, the server's own.
"""
import os
import site
import sys

_before = list(sys.path)
for _dir in filter(None, os.environ.get("TGEDGE_SITE", "").split(os.pathsep)):
    site.addsitedir(_dir)
sys.path[:] = [p for p in sys.path if p not in _before] + _before

from {module} import TritonPythonModel  # noqa: E402,F401
'''


@dataclass(frozen=True)
class RepositorySettings:
    backend: str = "python"
    instances: int = 1  # instances of every model (instance_group count)
    max_batch: int = 8  # images per batch of the batched stages
    queue_delay_us: int = 2000  # how long the dynamic batcher waits to fill a batch
    # requests one entry instance decodes at once: its scheduler's slots where the decoder batches
    # (`decoding`), else threads each with its own KV cache; 1 for TensorRT
    max_inflight: int = 8
    threads: int = 1  # ONNX Runtime intra-op threads per session (parallelism comes from concurrent requests)
    # the entry's decoder under in-flight batching, where one thread steps every request: None = ONNX Runtime's
    # default (the machine's cores), else that many
    decoder_threads: int | None = None
    conversations: int = CONVERSATIONS  # conversations whose KV caches an entry instance keeps

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise TgedgeError(f"unknown Triton backend {self.backend!r} (choose from {', '.join(BACKENDS)})")
        for name in ("instances", "max_batch", "max_inflight", "threads", "conversations"):
            if getattr(self, name) < 1:
                raise TgedgeError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.decoder_threads is not None and self.decoder_threads < 1:
            raise TgedgeError(f"decoder_threads must be >= 1 (got {self.decoder_threads})")
        if self.queue_delay_us < 0:
            raise TgedgeError(f"queue_delay_us must be >= 0 (got {self.queue_delay_us})")


@dataclass
class RepositoryResult:
    directory: Path
    backend: str
    models: dict[str, str] = field(default_factory=dict)  # model -> what it is
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"directory": str(self.directory), "backend": self.backend, "models": self.models, "notes": self.notes}


def _pb2():
    require_tritonclient("triton")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2, text_format


# -- configs ----------------------------------------------------------------------------------------------------
def _dims(shape, batched: bool) -> list[int]:
    """A contract shape as Triton dims: symbolic dims are -1; the first dim is Triton's batch dim when batched."""
    return [d if isinstance(d, int) else -1 for d in (shape[1:] if batched else shape)]


def _tensor(pb, message, t: TensorMeta | Field, batched: bool):
    dtype = t.dtype
    if dtype not in TRITON_TYPES:
        raise TgedgeError(f"tensor {t.name!r}: dtype {dtype} has no Triton type")
    out = message(name=t.name, data_type=pb.DataType.Value(TRITON_TYPES[dtype]),
                  dims=_dims(t.shape, batched) if isinstance(t, TensorMeta) else list(t.dims))
    if isinstance(t, Field) and t.optional:
        out.optional = True
    return out


def stage_batch(contract: StageContract, stage: str, max_batch: int, views: int, dims: dict | None) -> int:
    """Triton's max_batch_size for a stage: its first dim is the batch (images) or the views (views per image
    x images). An engine accepts what its optimisation profile allows, no more."""
    first = contract.stages[stage].inputs[0].shape[0]
    wanted = max_batch * (views if first == VIEWS else 1)
    return wanted if dims is None else min(wanted, dims[first]["max"])


def stage_config(contract: StageContract, stage: str, settings: RepositorySettings, views: int,
                 engine_dims: dict | None = None, vocab: int | None = None):
    """The ModelConfig of one stage model (`views`: vision views per image; `engine_dims`: an engine's profile;
    `vocab`: the vocabulary its `input_ids` index, which the Python stage checks them against)."""
    pb, _ = _pb2()
    s = contract.stages[stage]
    batched = s.inputs[0].shape[0] in (BATCH, VIEWS)
    config = pb.ModelConfig(name=stage)
    if settings.backend == "python":
        config.backend = "python"
        config.parameters["stage"].string_value = stage
        config.parameters["threads"].string_value = str(settings.threads)
        if vocab:
            config.parameters["vocab_size"].string_value = str(vocab)
    elif settings.backend == "onnxruntime":
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = "model.onnx"
    else:
        config.platform = "tensorrt_plan"
        config.default_model_filename = "model.plan"
    config.max_batch_size = stage_batch(contract, stage, settings.max_batch, views, engine_dims) if batched else 0
    config.input.extend(_tensor(pb, pb.ModelInput, t, batched) for t in s.inputs)
    config.output.extend(_tensor(pb, pb.ModelOutput, t, batched) for t in s.outputs)
    if stage in BLS_STAGES:
        config.dynamic_batching.max_queue_delay_microseconds = settings.queue_delay_us
    kind = {"python": "KIND_CPU", "onnxruntime": "KIND_AUTO", "tensorrt": "KIND_GPU"}[settings.backend]
    group = config.instance_group.add(count=settings.instances, kind=pb.ModelInstanceGroup.Kind.Value(kind))
    if settings.backend == "tensorrt" and stage == "decoder":
        group.profile.extend(str(i) for i in range(len(contract.cache.profiles)))  # prefill, decode: by shape
    return config


def _engine_dims(manifest, stage: str) -> dict:
    """The manifest's dims as an engine's profile has them: the batch and views maxima times its max batch."""
    n = manifest.engine_batch(stage)
    return {k: {**v, "max": v["max"] * n} if k in (BATCH, VIEWS) else v for k, v in manifest.dims.items()}


def inflight(settings: RepositorySettings, decoder_batch: int | None = None) -> int:
    """Requests one entry instance decodes at once: `max_inflight`; under TensorRT at most the decoder engine's
    max batch (its scheduler's slots; one execution context, so 1 where the engine holds one sequence)."""
    if settings.backend == "tensorrt":
        return min(settings.max_inflight, decoder_batch or 1)
    return settings.max_inflight


def entry_config(contract: StageContract, settings: RepositorySettings, decoder_batch: int | None = None):
    """The ModelConfig of the entry model: decoupled, image bytes + question in, the answer streamed out."""
    pb, _ = _pb2()
    config = pb.ModelConfig(name=ENTRY_MODEL, backend="python", max_batch_size=0)
    config.model_transaction_policy.decoupled = True
    config.input.extend(_tensor(pb, pb.ModelInput, f, False) for f in REQUEST)
    config.output.extend(_tensor(pb, pb.ModelOutput, f, False) for f in RESPONSE)
    kind = "KIND_CPU" if settings.backend == "python" else "KIND_GPU"
    config.instance_group.add(count=settings.instances, kind=pb.ModelInstanceGroup.Kind.Value(kind))
    params = {"runtime_backend": RUNTIME_BACKEND[settings.backend],
              "bls_stages": ",".join(s for s in BLS_STAGES if contract.has(s)),
              "max_inflight": str(inflight(settings, decoder_batch)),
              "threads": str(settings.threads), "export": EXPORT_SUBDIR, "conversations": str(settings.conversations),
              # one thread steps the scheduler: its decoder gets the cores (0: ONNX Runtime's default), where the
              # per-request path's parallelism comes from its concurrent requests
              "decoder_threads": str(settings.decoder_threads or 0)
              if decoding_problem(contract, settings, decoder_batch) is None else str(settings.threads)}
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def decoding_problem(contract: StageContract, settings: RepositorySettings, decoder_batch: int | None = None
                     ) -> str | None:
    """Why the entry model will decode each request on its own, or None: in-flight batching (`Entry` decides the
    same at load, from `runtime.batched.batching_problem`)."""
    from tgedge.runtime.batched import cache_problem

    if settings.backend == "tensorrt" and (decoder_batch or 1) == 1:
        return "the decoder engine holds one sequence: tgedge build --max-batch N batches N"
    if inflight(settings, decoder_batch) == 1:
        return "max_inflight is 1"
    return cache_problem(contract.cache)


def decoding(contract: StageContract, settings: RepositorySettings, decoder_batch: int | None = None) -> str:
    """How the entry model will decode, and why."""
    slots, problem = inflight(settings, decoder_batch), decoding_problem(contract, settings, decoder_batch)
    threads = settings.decoder_threads or "ONNX Runtime's default"
    if problem is None:
        return (f"in-flight batching: one scheduler of {slots} slots per instance, requests share decoder steps "
                f"(the decoder on {threads} threads)")
    return f"each request decodes on its own, at most {slots} at once ({problem})"


def config_text(config) -> str:
    _, text_format = _pb2()
    return text_format.MessageToString(config)


def parse_config(path: str | Path):
    """A config.pbtxt read with Triton's own schema; a file that does not parse is named."""
    pb, text_format = _pb2()
    try:
        return text_format.Parse(Path(path).read_text(encoding="utf-8"), pb.ModelConfig())
    except text_format.ParseError as e:
        raise TgedgeError(f"{path}: not a Triton model config ({e})") from None


# -- files ------------------------------------------------------------------------------------------------------
def _link(src: Path, dst: Path) -> None:
    """Hard link (one copy on disk), a copy where the file system has none."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _check_engines(manifest: Manifest, source) -> None:
    if not manifest.engines:
        raise TgedgeError(f"{source}: --backend tensorrt needs an engine directory (tgedge build EXPORT -o DIR "
                          "--backend tensorrt); this is an export directory")
    missing = [s for s in manifest.contract.stage_names if s not in manifest.engines]
    if missing:
        raise TgedgeError(f"{source}: no engine for {', '.join(missing)} (build every graph for Triton)")
    other = sorted({e.get("backend") for e in manifest.engines.values()} - {"tensorrt"})
    if other:
        raise TgedgeError(f"{source}: engines built with {', '.join(map(str, other))}; Triton's tensorrt backend "
                          "runs TensorRT engines (tgedge build --backend tensorrt)")


def _vocab(model: dict, stage: str) -> int | None:
    """The vocabulary a stage's `input_ids` index: the text guide's or the decoder's; None for other stages."""
    part = {"text_guide": "text_guide", "embed": "decoder"}.get(stage)
    return (model.get(part) or {}).get("vocab_size") if part else None


def _check_graph_io(manifest: Manifest, stage: str) -> None:
    """As `run` checks its sessions: two graphs swapped with their checksums rewritten pass the sha256 check, not
    this one."""
    from tgedge.inspection import inspect_onnx

    g = inspect_onnx(manifest.graph_path(stage))
    check_graph_io(manifest, stage, [TensorMeta.from_dict(t) for t in g.inputs],
                   [TensorMeta.from_dict(t) for t in g.outputs])


def write_repository(source: str | Path, out: str | Path, settings: RepositorySettings | None = None,
                     force: bool = False, verify: bool = True) -> RepositoryResult:
    """`verify`: each graph's files are checked against the manifest's sha256 first, as `validate` checks them (a
    swapped graph would be served); engines (`--backend tensorrt`) are checked against their own metadata."""
    settings = settings or RepositorySettings()
    manifest = Manifest.load(source)
    contract = manifest.contract
    if verify and settings.backend != "tensorrt":
        for stage in contract.stage_names:
            manifest.verify(stage, full=True)
            _check_graph_io(manifest, stage)
    if verify:
        manifest.verify_files()  # the entry model preprocesses with them, whichever backend runs the stages
    views = contract.fusion_family.views(manifest.model)
    if settings.backend == "tensorrt":
        _check_engines(manifest, source)
    result = RepositoryResult(Path(out), settings.backend)
    trt = settings.backend == "tensorrt"
    decoder_batch = manifest.engine_batch("decoder") if trt else None
    with atomic_dir(out, kind="repository", inputs=[source], force=force) as tmp:
        export = tmp / ENTRY_MODEL / "1" / EXPORT_SUBDIR
        for name in manifest.listed_files():
            target = inside(tmp, f"{ENTRY_MODEL}/1/{EXPORT_SUBDIR}/{name}", f"{manifest.directory}/manifest.json")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(inside(manifest.directory, name, f"{manifest.directory}/manifest.json"), target)
        entry = entry_config(contract, settings, decoder_batch)
        (tmp / ENTRY_MODEL / "config.pbtxt").write_text(config_text(entry))
        (tmp / ENTRY_MODEL / "1" / "model.py").write_text(MODEL_PY.format(module="tgedge.serving.entry"))
        result.models[ENTRY_MODEL] = (f"entry: decoupled Python model, {settings.instances} instance(s); "
                                      f"{entry.parameters['bls_stages'].string_value} through BLS, the rest on "
                                      f"{RUNTIME_BACKEND[settings.backend]} in the instance; "
                                      f"{decoding(contract, settings, decoder_batch)}")
        for stage in contract.stage_names:
            config = stage_config(contract, stage, settings, views, _engine_dims(manifest, stage) if trt else None,
                                  _vocab(manifest.model, stage))
            version = tmp / stage / "1"
            graph = manifest.graphs[stage]
            if settings.backend == "tensorrt":
                _link(export / manifest.engines[stage]["file"], version / "model.plan")
            else:
                _link(export / graph.file, version / "model.onnx")
                # the graph names its weights file, and the files it shares (a tied decoder reads the embed graph's
                # table): each keeps its name beside it, or onnxruntime cannot find it
                for data in ([graph.external_data] if graph.external_data else []) + list(graph.shared_data):
                    _link(export / data, version / data)
            if settings.backend == "python":
                (version / "model.py").write_text(MODEL_PY.format(module="tgedge.serving.stage"))
            (tmp / stage / "config.pbtxt").write_text(config_text(config))
            batching = (f", dynamic batching up to {config.max_batch_size}" if config.HasField("dynamic_batching")
                        else "")
            result.models[stage] = f"{config.backend or config.platform}{batching}"
            if trt and stage in BLS_STAGES and config.max_batch_size < \
                    stage_batch(contract, stage, settings.max_batch, views, None):
                result.notes.append(f"{stage}: the engine's profile allows {config.max_batch_size} per batch; build "
                                    "it with a larger tgedge build --max-batch to batch more")
    return result


def check_repository(repo: str | Path) -> list[str]:
    """The models of a repository `tgedge serve` may start, or one line saying what is missing: every model the
    repository's marker lists (`tgedge triton` wrote them) and every stage the entry model calls through BLS."""
    root = Path(repo)
    if not root.is_dir():
        raise TgedgeError(f"{repo}: {absent(repo, 'model repository')}")
    for d in root.iterdir():  # a FIFO or a device as a model's config: named, not "missing"
        if (d / "config.pbtxt").exists():
            regular_file(d / "config.pbtxt", "model configuration")
    models = sorted(d.name for d in root.iterdir() if (d / "config.pbtxt").is_file())
    if not models:
        raise TgedgeError(f"{repo}: no model (*/config.pbtxt) in it: write one with tgedge triton")
    marker = read_marker(root)
    written = {f.split("/")[0] for f in (marker or {}).get("files") or [] if f.endswith("/config.pbtxt")}
    needed = set(written)
    if ENTRY_MODEL in models:
        stages = parse_config(root / ENTRY_MODEL / "config.pbtxt").parameters["bls_stages"].string_value
        needed |= {s for s in stages.split(",") if s}
    missing = sorted(needed - set(models))
    if missing:
        raise TgedgeError(f"{repo}: model{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing from the "
                          "repository (tgedge triton wrote it; the entry model needs its stages): write the "
                          "repository again with tgedge triton")
    return models
