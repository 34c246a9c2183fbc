"""`tgedge quantize`: an fp32 export directory -> a new one with fp16 / int8 / weight-only graphs.

- fp16: onnxconverter-common's float16 converter. Kept in fp32: normalisations (LayerNormalization and
  every node of an RMSNorm/LayerNorm module), Softmax, and the node that produces the final logits;
  graph inputs and outputs stay fp32 (Casts inside), so the runtime's feeds do not change.
- int8: onnxruntime `quantize_static` in QDQ format as TensorRT wants it: symmetric int8, weights
  per channel, activations per tensor, on MatMul / Gemm / Conv with a weight (the MatMuls between two activations,
  attention's, stay fp32 unless `int8_attention`), ranges calibrated on the real inputs of
  each graph (`tgedge.calibration.collect`): min/max (the default) folded while the samples run, in the memory
  of the graphs alone; entropy / percentile from recorded feeds. The ranges are saved as `calibration.json`.
- int4w / int8w: weight-only, block-wise, symmetric, for constant-weight MatMuls: onnxruntime's MatMulNBits (what
  onnxruntime runs fastest), with a block size and accuracy level (`WeightOnly`; docs/BENCHMARKS.md has the
  measurements behind the defaults). `tgedge export --decoder-weights` writes the same blocks while streaming.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx

from tgedge.errors import TgedgeError
from tgedge.calibration.collect import FeedReader
from tgedge.calibration.weight_only import WeightOnly, nbits_attributes, nbits_blocks
from tgedge.config import bad_numbers
from tgedge.fileio import atomic_dir, inside, sha256_files
from tgedge.precision import FLOAT, HALF, PRECISIONS, QDQ, REFERENCE, WEIGHT_ONLY, Precision
from tgedge.runtime.manifest import Manifest, graph_fingerprint

log = logging.getLogger("tgedge")

METHODS = ("minmax", "entropy", "percentile")
QUANT_OPS = ("MatMul", "Gemm", "Conv")
EXTERNAL_DATA_BYTES = 512 << 20  # as tgedge export: graphs with more weight bytes keep them in `<graph>.onnx.data`
FP16_KEEP_OPS = ["Softmax", "LayerNormalization"]
CALIBRATION = "calibration.json"


def parse_precision(spec: str, graphs: list[str]) -> dict[str, Precision]:
    """`int8` or `vision=fp16,fusion=fp16,decoder=int8` -> graph -> precision for every graph of the export (a
    precision given alone applies to its stages, `Precision.stages`; the other graphs stay fp32)."""
    spec = spec.strip()
    if "=" not in spec:
        if spec not in PRECISIONS:
            raise TgedgeError(f"unknown precision {spec!r} (choose from {', '.join(PRECISIONS)})")
        whole = PRECISIONS[spec]
        return {g: whole if whole.applies_to(g) else REFERENCE for g in graphs}
    plan = {g: REFERENCE for g in graphs}
    for part in spec.split(","):
        graph, _, precision = part.partition("=")
        graph, precision = graph.strip(), precision.strip()
        if graph not in graphs:
            raise TgedgeError(f"unknown graph {graph!r} in --precision (this export has {', '.join(graphs)})")
        if precision not in PRECISIONS:
            raise TgedgeError(f"unknown precision {precision!r} for {graph} (choose from {', '.join(PRECISIONS)})")
        plan[graph] = PRECISIONS[precision]
    return plan


@dataclass
class GraphReport:
    precision: str
    quantized_nodes: list[str] = field(default_factory=list)
    fp32_nodes: list[str] = field(default_factory=list)  # kept out on purpose (fp16 islands, excludes)
    note: str = ""

    def to_dict(self) -> dict:
        """Counts, and where the fp32 islands are (module paths, e.g. /layers.0/input_layernorm)."""
        modules = sorted({(n.rsplit("/", 1)[0] if "/" in n else "") or "(top level)" for n in self.fp32_nodes})
        return {"precision": self.precision, "quantized_nodes": len(self.quantized_nodes),
                "fp32_nodes": len(self.fp32_nodes), "fp32_modules": modules, "note": self.note}


def _matched(proto: onnx.ModelProto, patterns: list[str]) -> list[str]:
    return [n.name for n in proto.graph.node if any(fnmatch.fnmatchcase(n.name, p) for p in patterns)]


def activation_products(proto: onnx.ModelProto) -> list[str]:
    """MatMuls between two activations, no weight on either side: attention's Q K^T and P V. int8 keeps them in
    fp32 by default (measured on demo-gated, docs/QUANTIZATION.md: per-tensor int8 on softmax probabilities is where
    the decoder's worst next-token drift came from)."""
    constant = {t.name for t in proto.graph.initializer}
    constant |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and not any(i in constant for i in n.input)]


def _norm_nodes(proto: onnx.ModelProto) -> list[str]:
    """Every node inside a normalisation module (names carry the module path: /layers.0/input_layernorm/Pow)."""
    return [n.name for n in proto.graph.node if any("norm" in part for part in n.name.split("/")[:-1])]


SKELETON_KEEP_BYTES = 64 << 10  # initializers this small keep their bytes in the skeleton (axes, shapes, scalars)


def inferred_types(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference on the graph's skeleton (initializers' names, types and dims, not their bytes): what types
    need, without a second copy of a multi-GB graph in memory."""
    light = onnx.ModelProto(ir_version=proto.ir_version, opset_import=proto.opset_import)
    g = light.graph
    g.node.extend(proto.graph.node)
    g.input.extend(proto.graph.input)
    g.output.extend(proto.graph.output)
    for t in proto.graph.initializer:  # axes, shapes, scalars keep their values: inference reads them
        small = t.data_location == onnx.TensorProto.DEFAULT and t.ByteSize() <= SKELETON_KEEP_BYTES
        g.initializer.append(t if small else _dims_only(t))
    return onnx.shape_inference.infer_shapes(light)


def _dims_only(t: onnx.TensorProto) -> onnx.TensorProto:
    return onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)


def drop_noop_casts(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Casts to the type their input already has (the fp32 export's `.float()`s).

    The float16 converter retypes their outputs but keeps `to=FLOAT`, which onnxruntime then rejects."""
    inferred = inferred_types(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    outputs = {o.name for o in proto.graph.output}
    rename, keep = {}, []
    for node in proto.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and node.output[0] not in outputs and types.get(node.input[0]) == to:
            rename[node.output[0]] = node.input[0]
            continue
        keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    return proto


def restore_output_types(converted: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Cast back any graph output the converter left in fp16 (keep_io_types misses outputs that are also
    consumed inside the graph), so that the graph's outputs are exactly the manifest's."""
    want = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    for out in converted.graph.output:
        if out.type.tensor_type.elem_type != want[out.name]:
            inner = f"{out.name}_fp16"
            for node in converted.graph.node:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if i == out.name else i for i in node.input]
            converted.graph.node.append(onnx.helper.make_node("Cast", [inner], [out.name], name=f"{out.name}_to_fp32",
                                                              to=want[out.name]))
            out.type.tensor_type.elem_type = want[out.name]
    return converted


@contextlib.contextmanager
def _value_info_from_dims(float16):
    """The converter's value info of a retyped initializer from its declared dims instead of from its data read into
    numpy: the same value info, and an export's traced graph can be converted before its weights are written
    (export/traced_weights.py)."""
    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: onnx.helper.make_tensor_value_info(t.name, t.data_type,
                                                                                       list(t.dims))
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


def to_fp16(proto: onnx.ModelProto, exclude: list[str]) -> tuple[onnx.ModelProto, GraphReport]:
    import warnings

    from onnxruntime.transformers import float16

    proto = drop_noop_casts(proto)
    logits = [n.name for n in proto.graph.node if "logits" in n.output]
    # Top-level nodes compute positions, RoPE angles and masks (fp16 holds integers exactly only to 2048);
    # int -> float Casts stay too (the converter would retype their outputs but not their `to`).
    top = [n.name for n in proto.graph.node if n.name.count("/") <= 1 and n.op_type != "MatMul"]
    casts = [n.name for n in proto.graph.node if n.op_type == "Cast"]
    keep = sorted(set(_norm_nodes(proto) + logits + top + casts + exclude))
    kept = keep + [n.name for n in proto.graph.node if n.op_type in FP16_KEEP_OPS]
    original_outputs = onnx.ModelProto()
    original_outputs.graph.output.extend(proto.graph.output)
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(inferred_types(proto).graph.value_info)  # the converter's types, in place
    with warnings.catch_warnings(), _value_info_from_dims(float16):
        # constants beyond fp16's range (the -3.4e38 masks) are clipped, as intended
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(
            proto, keep_io_types=True, disable_shape_infer=True,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + FP16_KEEP_OPS, node_block_list=keep)
    converted = restore_output_types(converted, original_outputs)
    from onnxruntime.transformers.onnx_model import OnnxModel

    OnnxModel(converted).topological_sort()  # the converter appends its Casts at the end
    return converted, GraphReport(HALF.name, fp32_nodes=sorted(set(kept)))


def to_weight_only(proto: onnx.ModelProto, q: WeightOnly, exclude: list[str]) -> tuple[onnx.ModelProto, GraphReport]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(proto, bits=q.bits, block_size=q.block_size, is_symmetric=True,
                                     accuracy_level=q.accuracy_level, nodes_to_exclude=exclude,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    out = quantizer.model.model
    if q.lm_head:
        _lm_head_to_nbits(out, q, exclude)
    done = [n.name for n in out.graph.node if n.op_type == "MatMulNBits"]
    return out, GraphReport(q.precision.name, quantized_nodes=done, fp32_nodes=exclude,
                            note=f"block {q.block_size}, accuracy level {q.accuracy_level}"
                                 + (", LM head too" if q.lm_head else ""))


def _lm_head_to_nbits(proto: onnx.ModelProto, q: WeightOnly, exclude: list[str]) -> None:
    """The decoder's LM head (`/lm_head/Gemm`, x @ table^T) as MatMulNBits blocks of its (V, D) table, as
    `tgedge export --decoder-weights` writes it (the quantizer leaves Gemm alone); its fp32 table is dropped."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    for i, node in enumerate(proto.graph.node):
        transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        if node.op_type != "Gemm" or not node.name.startswith("/lm_head/") or node.name in exclude \
                or len(node.input) != 2 or node.input[1] not in inits or not transposed:
            continue
        table = inits[node.input[1]]
        packed, scales = nbits_blocks(numpy_helper.to_array(table).astype("float32").T, q)
        n, k = table.dims
        proto.graph.initializer.extend([numpy_helper.from_array(packed, f"lm_head.weight_Q{q.bits}"),
                                        numpy_helper.from_array(scales, "lm_head.weight_scales")])
        proto.graph.node[i].CopyFrom(onnx.helper.make_node(
            "MatMulNBits", [node.input[0], f"lm_head.weight_Q{q.bits}", "lm_head.weight_scales"], list(node.output),
            name=f"{node.name}_Q{q.bits}", **nbits_attributes(q, k, n)))
        if not any(table.name in m.input for m in proto.graph.node):
            proto.graph.initializer.remove(table)


def to_int8(precision: Precision, src: Path, dst: Path, reader, method: str, exclude: list[str], cache: Path,
            external: bool = False) -> GraphReport:
    """`precision`: the Q/DQ one (int8: symmetric int8 weights per channel, activations per tensor)."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    onnxruntime.set_default_logger_severity(3)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process goes to the root logger; our graphs are exported clean
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per calibration batch
            quantize_static(
                str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANT_OPS),
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude, calibrate_method=calibrate, calibration_cache_path=str(cache),
                use_external_data_format=external,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                               "QuantizeBias": False,  # TensorRT has no int32 DequantizeLinear
                               # one sample at a time: the histogram calibrators cannot stack feeds of
                               # different shapes (prompt lengths differ)
                               "CalibStridedMinMax": 1})
    finally:
        root.setLevel(level)
    out = onnx.load(str(dst), load_external_data=False)
    dq_outputs = {o for n in out.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    done = [n.name for n in out.graph.node if n.op_type in QUANT_OPS and any(i in dq_outputs for i in n.input)]
    return GraphReport(precision.name, quantized_nodes=done, fp32_nodes=exclude)


def _shared_refs(structure: onnx.ModelProto, own: str | None, available: set[str]) -> dict[str, onnx.TensorProto]:
    """Initializers a graph reads from another graph's weight file (a tied table) that this output keeps."""
    out = {}
    for t in structure.graph.initializer:
        location = next((e.value for e in t.external_data if e.key == "location"), None)
        if location and location != own and location in available:
            out[t.name] = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims,
                                           data_location=t.data_location, external_data=t.external_data)
    return out


def _restore_shared(proto: onnx.ModelProto, shared: dict[str, onnx.TensorProto]) -> None:
    """Point still-unchanged shared initializers back at the other graph's file: stored once, as exported."""
    for t in proto.graph.initializer:
        ref = shared.get(t.name)
        if ref is not None and t.data_type == ref.data_type and list(t.dims) == list(ref.dims):
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.extend(ref.external_data)


def save_graph(proto: onnx.ModelProto, target: Path) -> None:
    """Save with its weights in `<graph>.onnx.data` when they are over EXTERNAL_DATA_BYTES (a graph file never
    nears protobuf's 2 GiB), inline otherwise; tensors kept in another graph's file stay there."""
    from tgedge.fileio import usual_file_mode

    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer if t.HasField("raw_data"))
    external = weight_bytes > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(target), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{target.name}.data", size_threshold=1024)
    for f in target.parent.glob(f"{target.name}*"):
        usual_file_mode(f)
    onnx.checker.check_model(str(target))


def _entry(entry, precision: str, target: Path):
    """The manifest entry of a rewritten graph: its files as they are now."""
    from tgedge.fileio import usual_file_mode

    for f in target.parent.glob(f"{target.name}*"):
        usual_file_mode(f)
    structure = onnx.load(str(target), load_external_data=False)
    locations = {e.value for t in structure.graph.initializer for e in t.external_data if e.key == "location"}
    own = f"{target.name}.data" if f"{target.name}.data" in locations else None
    shared = sorted(locations - {own} if own else locations)
    files = [target] + ([target.parent / own] if own else []) + [target.parent / f for f in shared]
    return type(entry)(entry.name, entry.file, precision, entry.inputs, entry.outputs, sha256_files(files), own,
                       graph_fingerprint(files), shared)


@dataclass
class QuantizeResult:
    directory: Path
    manifest: Manifest
    reports: dict[str, GraphReport]
    calibration: dict | None = None

    def to_dict(self) -> dict:
        return {"directory": str(self.directory), "graphs": {g: r.to_dict() for g, r in self.reports.items()},
                "calibration": None if self.calibration is None else
                {k: v for k, v in self.calibration.items() if k != "graphs"}}


def _data_hash(folder: Path) -> str:
    return sha256_files([folder / "samples.jsonl"] + sorted((folder / "images").glob("*")))


# -- plan: each graph's precision, and which graphs int8 calibrates ------------------------------------------------
@dataclass
class Plan:
    precisions: dict[str, Precision]  # graph -> what it becomes
    calibrated: list[str]  # the Q/DQ graphs with MatMul / Gemm / Conv to quantise: the ones that need ranges


def plan_quantization(src: Manifest, precision: str, method: str) -> Plan:
    """Refuses what cannot be done before any work: an unknown method, an export that is not fp32, a Q/DQ decoder
    of a static-onnx export."""
    if method not in METHODS:
        raise TgedgeError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")
    not_fp32 = {g: e.precision for g, e in src.graphs.items() if e.precision != REFERENCE.name}
    if not_fp32:
        raise TgedgeError(f"{src.directory}: quantize an fp32 export (tgedge export); these graphs are not fp32: "
                          f"{not_fp32}")
    plan = parse_precision(precision, list(src.graphs))
    if "decoder" in plan and plan["decoder"].form == QDQ and src.contract.cache.mode == "static-onnx":
        raise TgedgeError(f"{src.directory}: int8 of a static-onnx decoder is not supported: onnxruntime's quantizer "
                          "writes opset-24 QuantizeLinear nodes that onnxruntime itself refuses; quantise its decoder "
                          "int4w or fp16 (e.g. --precision vision=int8,fusion=int8,decoder=int4w), or export with "
                          "--cache growing")
    calibrated = [g for g, p in plan.items() if p.form == QDQ and any(
        n.op_type in QUANT_OPS for n in onnx.load(str(src.graph_path(g)), load_external_data=False).graph.node)]
    return Plan(plan, calibrated)


# -- calibrate: the ranges int8 needs, from a saved calibration.json or measured on calibration data ---------------
@dataclass
class Calibration:
    method: str
    saved: dict | None = None  # a calibration.json given with --calibration
    streamed: dict = field(default_factory=dict)  # graph -> ranges measured while the samples ran (minmax)
    feeds: dict = field(default_factory=dict)  # graph -> recorded inputs (entropy, percentile)
    data: str | Path | None = None
    samples: int = 0
    ranges: dict[str, dict] = field(default_factory=dict)  # graph -> the ranges its graph was quantised with

    def write_cache(self, graph: str, cache: Path) -> None:
        """The ranges of `graph` where onnxruntime's quantize_static reads them (none: it measures on the feeds)."""
        if self.saved is not None:
            cache.write_text(json.dumps(self.saved["graphs"][graph]))
        elif graph in self.streamed:
            from onnxruntime.quantization.calibrate import save_tensors_data

            save_tensors_data(self.streamed.pop(graph), cache)

    def record(self) -> dict | None:
        """calibration.json: where the ranges came from, and the ranges (None when no graph used any)."""
        if not self.ranges:
            return None
        record = self.saved if self.saved is not None else {
            "method": self.method, "data": {"path": str(self.data), "samples": self.samples,
                                            "sha256": _data_hash(Path(self.data))}}
        return {**{k: v for k, v in record.items() if k != "graphs"}, "graphs": self.ranges}


def read_calibration(path: str | Path, graphs: list[str]) -> dict:
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TgedgeError(f"{path}: cannot read calibration ({e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("graphs"), dict):
        raise TgedgeError(f"{path}: not a tgedge calibration file (no 'graphs' object)")
    bad = bad_numbers(saved["graphs"], f"{path} graphs", max_abs=1e6)
    if bad:
        raise TgedgeError(f"{path}: calibration ranges that are not finite or beyond 1e6: {', '.join(bad[:5])}"
                          + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
    missing = [g for g in graphs if g not in saved.get("graphs", {})]
    if missing:
        raise TgedgeError(f"{path}: no calibration for {', '.join(missing)}")
    return saved


def calibrate(export_dir: str | Path, graphs: list[str], method: str, calib: str | Path | None,
              calibration: str | Path | None, calib_limit: int | None, say: Callable[[str], None],
              progress=None) -> Calibration:
    """`graphs`' ranges: read from `calibration` (a saved calibration.json), else measured with the fp32 export
    answering the `calib` samples."""
    result = Calibration(method, data=calib)
    if not graphs:
        return result
    if calibration is not None:
        result.saved = read_calibration(calibration, graphs)
        return result
    if calib is None:
        raise TgedgeError("int8 needs calibration data: --calib DIR (images/ + samples.jsonl, e.g. "
                          "`tgedge data shapes --split calibration -o DIR`) or --calibration calibration.json")
    from tgedge.calibration.collect import collect, collect_ranges
    from tgedge.data.folder import read_folder

    result.samples = len(read_folder(calib)[:calib_limit])
    if method == "minmax":
        say(f"measuring the ranges of {', '.join(graphs)} on {calib} ({result.samples} samples, streamed)")
        result.streamed = collect_ranges(export_dir, calib, graphs, QUANT_OPS, calib_limit, progress=progress)
    else:
        say(f"recording the inputs of {', '.join(graphs)} on {calib} ({result.samples} samples, kept for {method})")
        result.feeds = collect(export_dir, calib, calib_limit, progress=progress)
    return result


# -- rewrite: each graph into the new directory, in its precision --------------------------------------------------
@dataclass
class Rewrite:
    """Writes the graphs of `src` into `out` one by one; graphs that stay fp32 are copied byte for byte."""
    src: Manifest
    out: Path
    work: Path  # scratch: quantize_static's range caches
    calibration: Calibration
    exclude: list[str]
    settings: dict  # WeightOnly.of's block_size, accuracy_level
    int8_attention: bool = False
    say: Callable[[str], None] = lambda s: None
    graphs: dict = field(default_factory=dict)  # graph -> its new manifest entry
    reports: dict[str, GraphReport] = field(default_factory=dict)
    used_patterns: set[str] = field(default_factory=set)
    verbatim: set[str] = field(default_factory=set)  # weight files copied byte for byte (with their graphs)

    def graph(self, graph: str, p: Precision) -> None:
        entry, path = self.src.graphs[graph], self.src.graph_path(graph)
        structure = onnx.load(str(path), load_external_data=False)  # ops and names; weights stay on disk
        excluded = _matched(structure, self.exclude)
        self.used_patterns |= {e for e in self.exclude if any(fnmatch.fnmatchcase(n, e) for n in excluded)}
        self.say(f"{graph}: {p.name}" + (f" ({len(excluded)} nodes excluded)" if excluded else ""))
        target = inside(self.out, entry.file, f"manifest.json graphs.{graph}.file")
        # fp16 converts every graph; the others quantise MatMul / Gemm / Conv, and a graph without any stays fp32
        keep = p is REFERENCE or (p.form != FLOAT and not any(n.op_type in QUANT_OPS for n in structure.graph.node))
        if keep and all(f in self.verbatim for f in entry.shared_data):
            self._copy(graph, p)
            return
        shared = _shared_refs(structure, entry.external_data, self.verbatim)
        if p.form == QDQ:
            report = self._to_qdq(graph, p, path, target, excluded, structure, bool(entry.external_data))
        else:
            proto = onnx.load(str(path))
            if keep:
                report = GraphReport(REFERENCE.name, note="its shared weights were re-written")
            elif p.form == FLOAT:
                proto, report = to_fp16(proto, excluded)
            else:
                proto, report = to_weight_only(proto, WeightOnly.of(p, **self.settings), excluded)
            _restore_shared(proto, shared)
            save_graph(proto, target)
            del proto
        self.reports[graph] = report
        self.graphs[graph] = _entry(entry, report.precision, target)

    def _copy(self, graph: str, p: Precision) -> None:
        entry = self.src.graphs[graph]
        for f in self.src.graph_files(graph)[:2 if entry.external_data else 1]:
            shutil.copyfile(f, self.out / f.name)
        self.verbatim |= {entry.external_data} if entry.external_data else set()
        self.graphs[graph] = entry
        report = GraphReport(REFERENCE.name)
        if p is not REFERENCE:  # nothing to quantise (e.g. embed, a Gather): it stays fp32, and says so
            report.note = f"no {'/'.join(QUANT_OPS)} to quantize: kept fp32"
        self.reports[graph] = report

    def _to_qdq(self, graph: str, p: Precision, path: Path, target: Path, excluded: list[str],
                structure: onnx.ModelProto, external: bool) -> GraphReport:
        cache = self.work / f"{graph}.calibration.json"
        self.calibration.write_cache(graph, cache)
        kept = excluded if self.int8_attention else sorted(set(excluded) | set(activation_products(structure)))
        report = to_int8(p, path, target, FeedReader(self.calibration.feeds.get(graph, [])), self.calibration.method,
                         kept, cache, external=external)
        self.calibration.ranges[graph] = json.loads(cache.read_text())
        return report


# -- write the manifest ----------------------------------------------------------------------------------------------
def write_manifest(src: Manifest, out: Path, rewrite: Rewrite, precision: str,
                   int8_attention: bool) -> tuple[Manifest, dict | None]:
    """manifest.json (and calibration.json when a graph was calibrated) of the rewritten export -> it and the
    calibration record."""
    record = rewrite.calibration.record()
    if record is not None:
        (out / CALIBRATION).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    calibrated = record is not None
    manifest = Manifest(graphs=rewrite.graphs, dims=src.dims, max_context=src.max_context, opset=src.opset,
                        model=src.model, source=src.source, reference=src.reference, files=src.files,
                        contract=src.contract,
                        quantization={"precision": precision,
                                      "method": rewrite.calibration.method if calibrated else None,
                                      "int8_attention": int8_attention if calibrated else None,
                                      "graphs": {g: r.to_dict() for g, r in rewrite.reports.items()},
                                      "calibration": CALIBRATION if calibrated else None})
    manifest.save(out)
    return manifest, record


def quantize_export(export_dir: str | Path, out: str | Path, precision: str, calib: str | Path | None = None,
                    method: str = "minmax", exclude: list[str] | None = None, calibration: str | Path | None = None,
                    calib_limit: int | None = None, on_step: Callable[[str], None] | None = None,
                    progress=None, force: bool = False, block_size: int | None = None,
                    accuracy_level: int | None = None, int8_attention: bool = False) -> QuantizeResult:
    """`block_size`, `accuracy_level`: int4w / int8w's MatMulNBits settings (None: the defaults, `WeightOnly`).
    `int8_attention`: int8 also quantises the MatMuls between two activations (`activation_products`), which it
    keeps in fp32 by default."""
    say = on_step or (lambda s: None)
    settings = {"block_size": block_size, "accuracy_level": accuracy_level}
    WeightOnly.of(WEIGHT_ONLY[0], **settings)  # settings refused before any work
    src = Manifest.load(export_dir)
    plan = plan_quantization(src, precision, method)
    ranges = calibrate(export_dir, plan.calibrated, method, calib, calibration, calib_limit, say, progress)
    exclude = exclude or []
    with atomic_dir(out, kind="export", inputs=[export_dir, calib, calibration], force=force) as tmp, \
            tempfile.TemporaryDirectory() as work:
        for key, name in src.files.items():
            shutil.copyfile(inside(src.directory, name, f"{src.directory}/manifest.json files.{key}"),
                            inside(tmp, name, f"manifest.json files.{key}"))
        rewrite = Rewrite(src, tmp, Path(work), ranges, exclude, settings, int8_attention, say)
        for graph, p in plan.precisions.items():
            rewrite.graph(graph, p)
        manifest, record = write_manifest(src, tmp, rewrite, precision, int8_attention)
    manifest.directory = Path(out)
    for p in exclude:
        if p not in rewrite.used_patterns:
            log.warning("--exclude %r matches no node in any graph", p)
    return QuantizeResult(Path(out), manifest, rewrite.reports, record)
