"""The graph converters behind `tgedge quantize`: one ONNX graph in, its reduced-precision form out.

- `to_fp16`: onnxconverter-common's float16 converter, normalisations / Softmax / the logits' producer kept fp32.
- `to_int8`: onnxruntime `quantize_static` in QDQ format (symmetric, weights per channel, activations per tensor).
- `to_weight_only`: MatMulNBits blocks (`WeightOnly`), the tied LM head included.
- `save_graph`: inline or `<graph>.onnx.data`, tensors shared with another graph's file left there.

`tgedge.calibration.quantize` decides which graph gets which (plan, calibrate, rewrite, write the manifest).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from tgedge.calibration.weight_only import WeightOnly, nbits_attributes, nbits_blocks
from tgedge.precision import HALF, Precision

QUANT_OPS = ("MatMul", "Gemm", "Conv")
EXTERNAL_DATA_BYTES = 512 << 20  # as tgedge export: graphs with more weight bytes keep them in `<graph>.onnx.data`
FP16_KEEP_OPS = ["Softmax", "LayerNormalization"]


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


def matched_nodes(proto: onnx.ModelProto, patterns: list[str]) -> list[str]:
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


def shared_refs(structure: onnx.ModelProto, own: str | None, available: set[str]) -> dict[str, onnx.TensorProto]:
    """Initializers a graph reads from another graph's weight file (a tied table) that this output keeps."""
    out = {}
    for t in structure.graph.initializer:
        location = next((e.value for e in t.external_data if e.key == "location"), None)
        if location and location != own and location in available:
            out[t.name] = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims,
                                           data_location=t.data_location, external_data=t.external_data)
    return out


def restore_shared(proto: onnx.ModelProto, shared: dict[str, onnx.TensorProto]) -> None:
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
