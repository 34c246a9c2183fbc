"""`tgedge export`: a checkpoint -> an export directory (one ONNX graph per stage + manifest.json).

The TorchScript-based exporter (`torch.onnx.export(dynamo=False)`) is used on purpose: it writes opset 17
directly (what JetPack 6's TensorRT 10.3 parses), keeps the zero-length past of the prefill step dynamic
(torch.export specialises sizes 0 and 1), and its output is byte-identical from run to run.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from tgedge import __version__
from tgedge.errors import TgedgeError
from tgedge.contract import PAST, StageContract
from tgedge.export.specs import GraphSpec, graph_specs
from tgedge.fileio import atomic_dir, checkpoint_hash, sha256_files
from tgedge.runtime.manifest import GraphEntry, Manifest, graph_fingerprint

log = logging.getLogger("tgedge")

DEFAULT_OPSET = 17
MIN_OPSET = 14  # Trilu (the causal masks)
EXTERNAL_DATA_BYTES = 512 << 20  # graphs with more weight bytes keep them in `<graph>.onnx.data`


@dataclass
class CheckResult:
    """One graph output compared with torch at one setting of the symbolic dims."""
    graph: str
    dims: dict[str, int]
    output: str
    max_abs: float
    limit: float

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.limit

    def to_dict(self) -> dict:
        return {"graph": self.graph, "dims": self.dims, "output": self.output, "max_abs": self.max_abs,
                "limit": self.limit, "passed": self.passed}


@dataclass
class ExportResult:
    directory: Path
    manifest: Manifest
    checks: list[CheckResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {"directory": str(self.directory), "passed": self.passed,
                "graphs": {k: g.file for k, g in self.manifest.graphs.items()},
                "checks": [c.to_dict() for c in self.checks], "seconds": self.seconds}


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _set_dims(proto: onnx.ModelProto, spec: GraphSpec) -> None:
    """Write the spec's dims into the graph's inputs and outputs: the tracer leaves some static output dims
    symbolic (e.g. `Sliceimage_features_dim_1`), and the file must say what the manifest says."""
    metas = {t.name: t for t in spec.inputs + spec.outputs}
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, metas[value.name].shape):
            if isinstance(want, int):
                dim.Clear()
                dim.dim_value = want
            else:
                dim.Clear()
                dim.dim_param = want


def export_graph(spec: GraphSpec, path: Path, opset: int, external_data: bool | None) -> GraphEntry:
    """Trace one spec to `path` (+ `path.data` for external weights); checker and strict shape inference run."""
    gen = torch.Generator().manual_seed(0)
    dims = {**spec.check_shapes[1], PAST: max(spec.check_shapes[1].get(PAST, 0), 3)}  # trace a non-empty past
    args = tuple(spec.make_inputs(dims, gen).values())
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's to fix
        torch.onnx.export(spec.module.eval(), args, buf, dynamo=False, opset_version=opset,
                          input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                          dynamic_axes=spec.dynamic_axes, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    _set_dims(proto, spec)
    proto.doc_string = f"tgedge {__version__}: {spec.name} graph"
    for key, value in (("tgedge_version", __version__), ("tgedge_graph", spec.name)):
        proto.metadata_props.add(key=key, value=value)
    weight_bytes = sum(int(np.prod(t.dims)) * 4 for t in proto.graph.initializer)
    external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
    data_name = f"{path.name}.data" if external else None
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes_path(str(path), str(path) + ".inferred", strict_mode=True, data_prop=True)
    Path(str(path) + ".inferred").unlink()
    files = [path] + ([path.parent / data_name] if data_name else [])
    return GraphEntry(spec.name, path.name, "fp32", list(spec.inputs), list(spec.outputs), sha256_files(files),
                      data_name, graph_fingerprint(files))


def check_graph(spec: GraphSpec, path: Path) -> tuple[list[CheckResult], dict]:
    """The graph on onnxruntime CPU vs the torch module at the spec's two dim settings.

    Returns the results and, from the first setting, the reference outputs' checksums for the manifest."""
    from tgedge.runtime.onnxrt import OnnxRuntimeRunner, SessionFromOnnx

    results, reference = [], {}
    with OnnxRuntimeRunner(SessionFromOnnx(path), spec.name) as runner:
        for seed, dims in enumerate(spec.check_shapes):
            feed = spec.make_inputs(dims, torch.Generator().manual_seed(seed))
            with torch.no_grad():
                want = [t.numpy() for t in _as_tuple(spec.module(*feed.values()))]
            got = runner.infer({k: v.numpy() for k, v in feed.items()})
            for meta, w in zip(spec.outputs, want):
                g = got[meta.name]
                diff = float(np.abs(g.astype(np.float64) - w).max()) if g.shape == w.shape else float("inf")
                limit = spec.atol + spec.rtol * float(np.abs(w).max() if w.size else 0.0)
                results.append(CheckResult(spec.name, dict(dims), meta.name, diff, limit))
                if seed == 0:
                    reference[meta.name] = {"sha256": hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest(),
                                            "mean": float(w.mean()) if w.size else 0.0,
                                            "abs_max": float(np.abs(w).max()) if w.size else 0.0}
    return results, {"dims": dict(spec.check_shapes[0]), "seed": 0, "outputs": reference}


def export_model(checkpoint: str | Path, out: str | Path, opset: int = DEFAULT_OPSET, max_context: int | None = None,
                 clip: str | Path | None = None, external_data: bool | None = None,
                 on_step: Callable[[str], None] | None = None, force: bool = False) -> ExportResult:
    """Export every stage of a checkpoint to `out`, check each graph against torch, write manifest.json."""
    from tgedge.checkpoint import load_model

    if opset < MIN_OPSET:
        raise TgedgeError(f"--opset {opset} is too old: tgedge's graphs need opset >= {MIN_OPSET} (default {DEFAULT_OPSET})")
    say = on_step or (lambda s: None)
    model, ckpt = load_model(checkpoint, clip)
    positions = model.cfg.decoder.max_position_embeddings
    max_context = min(positions, 4096) if max_context is None else max_context
    if not model.cfg.num_image_tokens < max_context <= positions:
        raise TgedgeError(f"--max-context must be in ({model.cfg.num_image_tokens}, {positions}] "
                          f"(image tokens, the model's max positions); got {max_context}")
    contract = StageContract.from_config(model.cfg.to_dict(), max_context)
    specs = graph_specs(model, contract)
    result = ExportResult(Path(out), None)  # type: ignore[arg-type]
    with atomic_dir(out, kind="export", inputs=[ckpt.path, clip], force=force) as tmp:
        graphs, reference = {}, {}
        for spec in specs:
            start = time.perf_counter()
            say(f"exporting {spec.name}")
            graphs[spec.name] = export_graph(spec, tmp / f"{spec.name}.onnx", opset, external_data)
            say(f"checking {spec.name} against torch")
            checks, reference[spec.name] = check_graph(spec, tmp / f"{spec.name}.onnx")
            result.checks += checks
            result.seconds[spec.name] = round(time.perf_counter() - start, 3)
        ckpt.preprocessor.save(tmp)
        files = {"preprocess": "preprocess.json", "tokenizer": "tokenizer.json"}
        if ckpt.preprocessor.guide_tokenizer is not None:
            files["guide_tokenizer"] = "guide_tokenizer.json"
        result.manifest = Manifest(graphs=graphs, dims=contract.dims, max_context=max_context,
                                   opset=opset, model=model.cfg.to_dict(), files=files, reference=reference,
                                   source={"checkpoint": str(checkpoint), "sha256": checkpoint_hash(ckpt.path)},
                                   contract=contract)
        result.manifest.save(tmp)
    result.manifest.directory = Path(out)
    return result
