"""`tgedge export`: a checkpoint -> an export directory (one ONNX graph per stage + manifest.json).

Memory stays bounded by the largest graph, not the model: the model is built on the meta device and each graph's
weights are loaded from the checkpoint for that graph alone, then dropped. The embed and decoder graphs (the bulk
of a VLM) are written directly from the config with their weights streamed tensor by tensor into external data
(`export/decoder_graph.py`); the vision-side graphs are traced with the TorchScript-based exporter
(`torch.onnx.export(dynamo=False)`, on purpose: opset 17 directly, what JetPack 6's TensorRT 10.3 parses, and
byte-identical output from run to run), structure only: their weights are folded and streamed by tgedge
(`export/traced_weights.py`), and each finished graph's memory is handed back before the next. Every graph is
checked against its torch module on onnxruntime CPU at two shapes, by relative error (what stays meaningful at depth
and logit scale), where memory allows.
"""

from __future__ import annotations

import functools
import hashlib
import os
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
from tgedge.fileio import atomic_dir, checkpoint_hash, sha256_files, usual_file_mode
from tgedge.precision import EXPORT_DTYPES, HALF, REFERENCE, WEIGHT_ONLY, Precision, lookup, names
from tgedge.runtime.manifest import GraphEntry, Manifest, file_sha256, graph_fingerprint

log = logging.getLogger("tgedge")

DEFAULT_OPSET = 17
MIN_OPSET = 14  # Trilu (the causal masks)


def newest_opset() -> int:
    """The newest opset an export can be written in: the vision-side graphs are traced by torch's exporter, which
    writes at most `torch.onnx._constants.ONNX_MAX_OPSET` (23 in torch 2.13; a higher one fails inside the trace,
    "Unsupported onnx_opset_version"), and the decoder is written with onnx's helpers, which know at most
    `onnx.defs.onnx_opset_version()`."""
    newest = onnx.defs.onnx_opset_version()
    try:
        from torch.onnx import _constants
    except ImportError:  # a torch without it: onnx's bound alone, the trace refuses what it cannot write
        return newest
    return min(newest, getattr(_constants, "ONNX_MAX_OPSET", newest))
EXTERNAL_DATA_BYTES = 512 << 20  # graphs with more weight bytes keep them in `<graph>.onnx.data`
# A graph output passes when its relative L2 error ||onnx - torch|| / ||torch|| is within its limit: fp32, its
# `noise_factor` times the torch module's own float64 noise on the same input (tgedge.drift); else, or where float64
# does not fit, the precision's `export_limit` (tgedge/precision.py).
CHECK_MEMORY_FACTOR = 3.0  # torch weights + onnxruntime's copy + activations, in units of the graph's fp32 weights


@dataclass
class CheckResult:
    """One graph output compared with torch at one setting of the symbolic dims (or why it was not)."""
    graph: str
    dims: dict[str, int]
    output: str
    max_abs: float
    rel_l2: float
    cosine: float
    limit: float  # on rel_l2
    skipped: str = ""
    scope: str = ""  # a part of the graph (a decoder too big to check whole: its first layers)
    noise: float | None = None  # rel_l2(torch fp32, torch float64) on the same input, when the limit is set by it

    @property
    def passed(self) -> bool:
        return bool(self.skipped) or self.rel_l2 <= self.limit

    def to_dict(self) -> dict:
        return {"graph": self.graph, "dims": self.dims, "output": self.output, "max_abs": self.max_abs,
                "rel_l2": self.rel_l2, "cosine": self.cosine, "limit": self.limit, "passed": self.passed,
                "skipped": self.skipped or None, "scope": self.scope or None, "noise": self.noise}


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


def _stamp(proto: onnx.ModelProto, name: str) -> None:
    proto.doc_string = f"tgedge {__version__}: {name} graph"
    for key, value in (("tgedge_version", __version__), ("tgedge_graph", name)):
        proto.metadata_props.add(key=key, value=value)


def _verify_file(path: Path) -> None:
    for f in path.parent.glob(f"{path.name}*"):
        usual_file_mode(f)  # onnx writes external data 0600: unreadable to a service user on a shared Jetson
    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes_path(str(path), str(path) + ".inferred", strict_mode=True, data_prop=True)
    Path(str(path) + ".inferred").unlink()


def trace_structure(spec: GraphSpec, path: Path, opset: int) -> onnx.ModelProto:
    """The spec's module traced by the TorchScript exporter without its weights (`export_params=False`) and without
    constant folding: the graph's structure, its weights as inputs named as the module names them."""
    gen = torch.Generator().manual_seed(0)
    dims = {**spec.check_shapes[1], PAST: max(spec.check_shapes[1].get(PAST, 0), 3)}  # trace a non-empty past
    args = tuple(spec.make_inputs(dims, gen).values())
    traced = path.with_name(f".{path.name}.traced")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's to fix
            torch.onnx.export(spec.module.eval(), args, str(traced), dynamo=False, opset_version=opset,
                              input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                              dynamic_axes=spec.dynamic_axes, export_params=False, do_constant_folding=False)
        return onnx.load(str(traced))
    finally:
        for f in path.parent.glob(f".{path.name}.traced*"):
            f.unlink()


def export_graph(spec: GraphSpec, path: Path, opset: int, external_data: bool | None,
                 dtype: Precision = REFERENCE) -> GraphEntry:
    """Trace one spec to `path` (+ `path.data` for external weights); checker and strict shape inference run.
    The exporter writes the structure only; the weights are folded and written by tgedge, one tensor at a time
    (export/traced_weights.py): memory stays the module's weights, not those plus folded copies plus a serialised
    model. fp16: converted as `tgedge quantize --precision fp16` converts (norms, softmax in fp32), before any
    weight is written, each written once in its final type."""
    from tgedge.export.traced_weights import fold_weights, module_values, place_weights

    proto = trace_structure(spec, path, opset)
    values = fold_weights(proto, module_values(spec.module))
    _set_dims(proto, spec)
    if dtype is HALF:
        from tgedge.calibration.convert import to_fp16

        proto, _ = to_fp16(proto, [])
    _stamp(proto, spec.name)
    weight_bytes = sum(int(np.prod(t.dims)) * 4 for t in proto.graph.initializer)
    external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
    data_name = f"{path.name}.data" if external else None
    place_weights(proto, values, path.parent, data_name)
    values.clear()  # its folds refer to the dict itself: cleared, the module's tensors go as soon as it releases them
    from tgedge.export.decoder_graph import save

    save(proto, path)
    _verify_file(path)
    files = [path] + ([path.parent / data_name] if data_name else [])
    return GraphEntry(spec.name, path.name, dtype.name, list(spec.inputs), list(spec.outputs), sha256_files(files),
                      data_name, graph_fingerprint(files))


def write_graph(spec: GraphSpec, model, contract: StageContract, weights, path: Path, dtype: Precision,
                external_data: bool | None, embed_table=None, decoder_weights=None) -> tuple[GraphEntry, object]:
    """Write the embed or decoder graph from the config, weights streamed (export/decoder_graph.py); `decoder_weights`
    a `WeightOnly` (int4w / int8w MatMulNBits) or None. -> (its manifest entry, the embed table's initializer for a
    tied decoder to share)."""
    from tgedge.export import decoder_graph

    names = [n for n in weights if n.startswith(spec.prefixes)]
    itemsize = np.dtype(dtype.float_dtype).itemsize
    nbytes = sum(int(np.prod(weights.shape(n))) for n in names) * itemsize
    external = nbytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
    if spec.name == "embed":
        proto, store = decoder_graph.build_embed(model.cfg, contract, weights, path.parent, path.name,
                                                 dtype.float_dtype, external)
        table = store.initializers[0]
    else:
        proto, store = decoder_graph.build_decoder(model.cfg, contract, weights, path.parent, path.name,
                                                   dtype.float_dtype, external, embed_table, decoder_weights)
        table = None
    _stamp(proto, spec.name)
    decoder_graph.save(proto, path)
    _verify_file(path)
    data_name = store.data_file
    shared = sorted({e.value for t in proto.graph.initializer for e in t.external_data
                     if e.key == "location" and e.value != data_name})
    files = [path] + ([path.parent / data_name] if data_name else []) + [path.parent / f for f in shared]
    precision = decoder_weights.precision if spec.name == "decoder" and decoder_weights else dtype
    entry = GraphEntry(spec.name, path.name, precision.name, list(spec.inputs), list(spec.outputs), sha256_files(files),
                       data_name, graph_fingerprint(files), shared)
    return entry, table


def return_freed_memory() -> None:
    """Hand the memory of a finished graph back to the system (glibc's `malloc_trim`): freed tensors otherwise stay
    in the allocator's heap, and every later graph's peak would sit on top of them (measured on the 0.5 B preset:
    the text tower's 0.5 GB was still resident while the vision tower exported)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()  # cycles (a traced module's) first: what they hold is freed before the heap is trimmed
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to do
        pass


def source_record(given, path: Path, out: Path) -> dict:
    """Where the reference checkpoint is, for validate: as given, absolute, and relative to the export directory
    (found again when both move together), with the weights' hash."""
    path = path.resolve()
    return {"checkpoint": str(given), "path": str(path), "relative": os.path.relpath(path, out.resolve()),
            "sha256": checkpoint_hash(path)}


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: assume it fits


def _figures(got: np.ndarray, want: np.ndarray) -> tuple[float, float, float]:
    if got.shape != want.shape:
        return float("inf"), float("inf"), -1.0
    g, w = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    d = g - w
    norm = float(np.linalg.norm(w))
    rel = float(np.linalg.norm(d)) / norm if norm else float(np.abs(d).max(initial=0.0))
    denom = float(np.linalg.norm(g)) * norm
    cos = float(g @ w) / denom if denom else float(np.array_equal(g, w))
    return float(np.abs(d).max(initial=0.0)), rel, cos


def _check_bytes(weights, prefixes: tuple[str, ...]) -> float:
    return CHECK_MEMORY_FACTOR * 4 * sum(int(np.prod(weights.shape(n))) for n in weights if n.startswith(prefixes))


def check_graph(spec: GraphSpec, path: Path, model, weights, precision: Precision,
                truncated=None) -> tuple[list[CheckResult], dict]:
    """The graph on onnxruntime CPU vs its torch module (fp32, its weights loaded for this check) at the spec's two
    dim settings. When the torch module and onnxruntime's copy would not fit in memory, `truncated(layers)` (the
    decoder) gives the same graph written with its first layers only, checked instead (the same builder, weights,
    shapes and dtype); without it, the check is skipped and says so.

    Returns the results and, from the first setting, the reference outputs' checksums for the manifest."""
    limit = precision.export_limit
    need = _check_bytes(weights, spec.prefixes)
    if need <= _available_bytes():
        return _compare(spec, path, model, weights, precision)
    why = f"the whole graph needs ~{need / 2**30:.1f} GiB, {_available_bytes() / 2**30:.1f} GiB available"
    for layers in ((2, 1) if truncated is not None else ()):
        part_path, part = truncated(layers)
        if _check_bytes(weights, part.prefixes) > _available_bytes():
            continue
        try:
            results, _ = _compare(part, part_path, model, weights, precision)
        finally:
            for f in part_path.parent.glob(f"{part_path.name}*"):
                f.unlink()
        scope = f"first {layers} of {model.cfg.decoder.num_layers} layers ({why})"
        for r in results:
            r.scope = scope
        return results, {}
    return [CheckResult(spec.name, {}, o.name, float("nan"), float("nan"), float("nan"), limit, why)
            for o in spec.outputs], {}


def _compare(spec: GraphSpec, path: Path, model, weights, precision: Precision) -> tuple[list[CheckResult], dict]:
    from tgedge.checkpoint import materialize
    from tgedge.drift import noise_limit, rel_l2
    from tgedge.noise import module_exact
    from tgedge.runtime.onnxrt import OnnxRuntimeRunner, SessionFromOnnx

    materialize(model, weights, spec.prefixes)
    # float64 widens the module's weights once more while it runs: measured only where that fits too
    by_noise = precision.noise_factor is not None and \
        _check_bytes(weights, spec.prefixes) * (CHECK_MEMORY_FACTOR + 1) / CHECK_MEMORY_FACTOR <= _available_bytes()
    results, reference = [], {}
    with OnnxRuntimeRunner(SessionFromOnnx(path), spec.name) as runner:
        for seed, dims in enumerate(spec.check_shapes):
            feed = spec.make_inputs(dims, torch.Generator().manual_seed(seed))
            with torch.no_grad():
                want = [t.float().numpy() for t in _as_tuple(spec.module(*feed.values()))]
            exact = module_exact(spec.module, feed) if by_noise else [None] * len(want)
            got = runner.infer({k: v.numpy() for k, v in feed.items()})
            if spec.defined is not None:
                got = {k: v[spec.defined(k, dims)] for k, v in got.items()}
                want = [w[spec.defined(meta.name, dims)] for meta, w in zip(spec.outputs, want)]
                exact = [e if e is None else e[spec.defined(meta.name, dims)] for meta, e in zip(spec.outputs, exact)]
            for meta, w, e in zip(spec.outputs, want, exact):
                max_abs, rel, cos = _figures(got[meta.name], w)
                noise = None if e is None else rel_l2(w, e)
                limit = precision.export_limit if noise is None else noise_limit(noise, precision.noise_factor)
                results.append(CheckResult(spec.name, dict(dims), meta.name, max_abs, rel, cos, limit, noise=noise))
                if seed == 0:
                    reference[meta.name] = {"sha256": hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest(),
                                            "mean": float(w.mean()) if w.size else 0.0,
                                            "abs_max": float(np.abs(w).max()) if w.size else 0.0}
    return results, {"dims": dict(spec.check_shapes[0]), "seed": 0, "outputs": reference}


def _truncated_decoder(model, contract: StageContract, weights, directory: Path, dtype: Precision, weight_only,
                       layers: int) -> tuple[Path, GraphSpec]:
    """The decoder graph with its first `layers` layers (final norm and LM head as they are), written by the same
    builder from the same weights, and its spec: what export checks when the whole decoder cannot be held."""
    import dataclasses

    from tgedge.export import decoder_graph

    cfg = dataclasses.replace(model.cfg, decoder=dataclasses.replace(model.cfg.decoder, num_layers=layers))
    part = StageContract.from_config(cfg.to_dict(), contract.max_context, contract.cache.mode, contract.dims,
                                     contract.cache.dtype)
    name = ".decoder-check.onnx"
    proto, _ = decoder_graph.build_decoder(cfg, part, weights, directory, name, dtype.float_dtype, True, None,
                                           weight_only)
    decoder_graph.save(proto, directory / name)
    spec = next(s for s in graph_specs(model, part) if s.name == "decoder")
    keep = ("language_model.embed_tokens.", "language_model.norm.", "lm_head.",
            *(f"language_model.layers.{i}." for i in range(layers)))
    return directory / name, dataclasses.replace(spec, prefixes=keep)


def export_model(checkpoint: str | Path, out: str | Path, opset: int = DEFAULT_OPSET, max_context: int | None = None,
                 clip: str | Path | None = None, external_data: bool | None = None,
                 on_step: Callable[[str], None] | None = None, force: bool = False, dtype: str = REFERENCE.name,
                 check: bool = True, decoder_weights: str | None = None, cache_mode: str = "growing",
                 block_size: int | None = None, accuracy_level: int | None = None,
                 target: str | None = None) -> ExportResult:
    """Export every stage of a checkpoint to `out`, check each graph against torch, write manifest.json.

    Memory: one graph's weights at a time (the model is built on the meta device, each graph's weights loaded from
    the checkpoint for it alone), the embed and decoder graphs streamed tensor by tensor. `decoder_weights`
    int4w / int8w writes the decoder's linear weights as MatMulNBits blocks while streaming (what `tgedge quantize
    --precision int4w` makes from an fp32 export, without the fp32 decoder in memory: how a 7 B model gets there),
    with `block_size` and `accuracy_level` as quantize takes them. `cache_mode` growing | static: the decoder's KV
    cache (tgedge.contract.CACHE_MODES; static = GroupQueryAttention over buffers shared in place, onnxruntime only;
    static-onnx = the same buffers in standard opset-24 ops, TensorScatter and Attention, for TensorRT too).
    `target` (tgedge.contract.TARGETS; `tgedge export`'s default onnxruntime), in place of `cache_mode`: the cache
    that backend decodes fastest (`cache_for_target`)."""
    from tgedge.calibration.weight_only import WeightOnly
    from tgedge.checkpoint import load_model, materialize, release
    from tgedge.contract import CACHE_MODES, TARGETS
    from tgedge.export.decoder_graph import cache_for_target, check_static

    if opset < MIN_OPSET:
        raise TgedgeError(f"--opset {opset} is too old: tgedge's graphs need opset >= {MIN_OPSET} (default {DEFAULT_OPSET})")
    if opset > newest_opset():
        raise TgedgeError(f"--opset {opset} is newer than the installed exporter writes (at most {newest_opset()}; "
                          f"default {DEFAULT_OPSET})")
    quantized = None if decoder_weights is None else lookup(decoder_weights, WEIGHT_ONLY)
    if decoder_weights is not None and quantized is None:
        raise TgedgeError(f"--decoder-weights {decoder_weights!r}: choose from {', '.join(names(WEIGHT_ONLY))}")
    if target is not None and target not in TARGETS:
        raise TgedgeError(f"--target {target!r}: choose from {', '.join(TARGETS)}")
    if target is None and cache_mode not in CACHE_MODES:
        raise TgedgeError(f"--cache {cache_mode!r}: choose from {', '.join(CACHE_MODES)}")
    if quantized is None and (block_size is not None or accuracy_level is not None):  # they would be ignored
        flag = "--block-size" if block_size is not None else "--accuracy-level"
        raise TgedgeError(f"{flag} sets the int4w/int8w decoder's MatMulNBits blocks: it needs --decoder-weights "
                          f"({', '.join(names(WEIGHT_ONLY))}); without it, leave it out")
    weight_only = WeightOnly.of(quantized, block_size, accuracy_level) if quantized else None
    floats = lookup(dtype, EXPORT_DTYPES)  # every graph's float type
    if floats is None:
        raise TgedgeError(f"--dtype {dtype!r}: choose from {', '.join(names(EXPORT_DTYPES))} (bf16: onnxruntime CPU "
                          "cannot run it to check the graphs here; export fp32 and let TensorRT choose)")
    say = on_step or (lambda s: None)
    model, ckpt = load_model(checkpoint, clip, device="meta")
    positions = model.cfg.decoder.max_position_embeddings
    max_context = min(positions, 4096) if max_context is None else max_context
    if not model.cfg.num_image_tokens < max_context <= positions:
        raise TgedgeError(f"--max-context must be in ({model.cfg.num_image_tokens}, {positions}] "
                          f"(image tokens, the model's max positions); got {max_context}")
    if target is not None:
        cache_mode = cache_for_target(target, model.cfg.decoder, say)
    if cache_mode == "static":
        check_static(model.cfg.decoder)
    contract = StageContract.from_config(model.cfg.to_dict(), max_context, cache_mode=cache_mode,
                                         cache_dtype=floats.float_dtype)
    specs = graph_specs(model, contract)
    result = ExportResult(Path(out), None)  # type: ignore[arg-type]
    with atomic_dir(out, kind="export", inputs=[ckpt.path, clip], force=force) as tmp:
        graphs, reference, table = {}, {}, None
        for spec in specs:
            start = time.perf_counter()
            path = tmp / f"{spec.name}.onnx"
            if spec.written:
                say(f"writing {spec.name} ({floats.name}, weights streamed from the checkpoint)")
                graphs[spec.name], shared = write_graph(spec, model, contract, ckpt.weights, path, floats,
                                                        external_data, table, weight_only)
                table = shared if shared is not None else table
            else:
                say(f"exporting {spec.name}")
                materialize(model, ckpt.weights, spec.prefixes)
                graphs[spec.name] = export_graph(spec, path, opset, external_data, floats)
            if check:
                say(f"checking {spec.name} against torch")
                part = None  # the decoder's first layers, written alone: what is checked when the whole does not fit
                if spec.name == "decoder" and cache_mode == "growing":
                    part = functools.partial(_truncated_decoder, model, contract, ckpt.weights, tmp, floats, weight_only)
                checked = quantized if spec.name == "decoder" and quantized else floats
                checks, reference[spec.name] = check_graph(spec, path, model, ckpt.weights, checked, part)
                result.checks += checks
            release(model, spec.prefixes)
            return_freed_memory()
            result.seconds[spec.name] = round(time.perf_counter() - start, 3)
        ckpt.preprocessor.save(tmp)
        files = {"preprocess": "preprocess.json", "tokenizer": "tokenizer.json"}
        if ckpt.preprocessor.guide_tokenizer is not None:
            files["guide_tokenizer"] = "guide_tokenizer.json"
        result.manifest = Manifest(graphs=graphs, dims=contract.dims, max_context=max_context,
                                   opset=opset, model=model.cfg.to_dict(), files=files, reference=reference,
                                   file_sha256={k: file_sha256(tmp / name) for k, name in files.items()},
                                   source=source_record(checkpoint, ckpt.path, Path(out)),
                                   contract=contract)
        result.manifest.save(tmp)
    result.manifest.directory = Path(out)
    return result
