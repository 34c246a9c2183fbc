"""`tgedge inspect`: what an ONNX graph, an export directory or a TensorRT engine holds, and whether it fits.

Torch-free (onnx + numpy), so it runs on the Jetson. Graph weights are counted from tensor dims, so graphs
with external data are inspected without reading gigabytes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tgedge.config import read_config_json
from tgedge.errors import TgedgeError, absent
from tgedge.fileio import regular_file
from tgedge.precision import REFERENCE, GraphEvidence, recognise

COMPUTE_OPS = ("MatMul", "Gemm", "Conv")
NOT_COMPUTE = {"Cast", "Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Concat", "Slice", "Range",
               "ConstantOfShape", "Equal", "Where", "Expand", "Transpose", "Identity", "QuantizeLinear",
               "DequantizeLinear", "LessOrEqual", "Greater", "And", "Not", "Less", "OneHot", "Tile", "Trilu", "ArgMax"}
# Memory of each Jetson Orin module and what L4T, CUDA and TensorRT leave of it (an estimate, see docs/JETSON.md).
DEVICES_GB = {"Orin Nano 8GB": 8, "Orin NX 16GB": 16, "AGX Orin 64GB": 64}
RESERVED_GB = 1.5
BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "uint8": 8, "int4": 4, "uint4": 4, "int32": 32,
        "int64": 64, "bool": 8, "float64": 64}


def _dtype(elem_type: int) -> str:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


@dataclass
class GraphSummary:
    path: str
    inputs: list[dict]
    outputs: list[dict]
    opset: int
    ops: dict[str, int]
    params: dict[str, int]  # dtype -> element count
    bytes: dict[str, int]  # dtype -> bytes
    compute_ops: int  # MatMul / Gemm / Conv
    qdq_wrapped: int  # of those, fed by a DequantizeLinear (Q/DQ int8, or block-wise int4 DQ)
    matmul_nbits: int  # onnxruntime weight-only MatMulNBits
    fp32_islands: dict[str, int] = field(default_factory=dict)  # fp16 graphs: compute nodes left in fp32, by op
    precision: str = REFERENCE.name

    @property
    def weight_bytes(self) -> int:
        return sum(self.bytes.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "weight_bytes": self.weight_bytes}


def _tensor_meta(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "dtype": _dtype(t.elem_type), "shape": dims})
    return out


def load_onnx(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    if not path.exists():
        raise TgedgeError(f"{path}: {absent(path, 'file')}")
    regular_file(path, "graph file")  # /dev/zero would be read forever, a FIFO would block
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise TgedgeError(f"{path}: not an ONNX model, or truncated ({type(e).__name__})") from None


def inspect_onnx(path: str | Path) -> GraphSummary:
    import onnx

    path = Path(path)
    proto = load_onnx(path)
    if not proto.graph.node:
        raise TgedgeError(f"{path}: not an ONNX model, or truncated (no nodes)")
    ops = Counter(n.op_type for n in proto.graph.node)
    params: Counter = Counter()
    nbytes: Counter = Counter()
    tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    for t in tensors:
        dtype, count = _dtype(t.data_type), int(np.prod(t.dims)) if t.dims else 1
        params[dtype] += count
        nbytes[dtype] += count * BITS.get(dtype, 32) // 8
    block_bits = set()
    for n in proto.graph.node:  # MatMulNBits keeps its packed weights as uint8; count them as int4/int8
        if n.op_type == "MatMulNBits":
            bits = next((a.i for a in n.attribute if a.name == "bits"), 4)
            block_bits.add(bits)
            k = next(a.i for a in n.attribute if a.name == "K")
            nn = next(a.i for a in n.attribute if a.name == "N")
            params[f"int{bits}"] += k * nn
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    compute = [n for n in proto.graph.node if n.op_type in COMPUTE_OPS]
    wrapped = sum(1 for n in compute if any(i in dq_out for i in n.input))
    nbits = ops.get("MatMulNBits", 0)
    islands: Counter = Counter()
    fp16 = params.get("float16", 0) > 0
    if fp16:
        inferred = onnx.shape_inference.infer_shapes(proto)
        types = {v.name: v.type.tensor_type.elem_type for v in
                 list(inferred.graph.value_info) + list(inferred.graph.output)}
        for n in proto.graph.node:
            if n.op_type not in NOT_COMPUTE and n.output and types.get(n.output[0]) == onnx.TensorProto.FLOAT:
                islands[n.op_type] += 1
    floats = frozenset(d for d, count in params.items() if count and d.startswith("float"))
    evidence = GraphEvidence(qdq=bool(wrapped and ops.get("QuantizeLinear")), nbits=frozenset(block_bits),
                             float_weights=floats)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphSummary(str(path), _tensor_meta(proto.graph.input), _tensor_meta(proto.graph.output), opset,
                        dict(ops.most_common()), dict(params), dict(nbytes), len(compute), wrapped, nbits,
                        dict(islands), recognise(evidence).name)


def memory_estimate(manifest, graphs: dict[str, GraphSummary]) -> dict:
    """Weights + KV cache at max context + prefill activations at max context (bytes), and per-device fit."""
    ctx = manifest.max_context
    weights = sum(g.weight_bytes for g in graphs.values())
    cache = manifest.contract.cache
    kv = 2 * cache.num_layers * cache.num_kv_heads * ctx * cache.head_dim * BITS.get(cache.dtype, 32) // 8
    dec = manifest.model["decoder"]
    hidden, vocab, heads = dec["hidden_size"], dec["vocab_size"], dec["num_heads"]
    act = 4 * (ctx * vocab + heads * ctx * ctx + 8 * ctx * hidden)  # logits, one layer's scores, hidden states
    total = weights + kv + act
    fits = {}
    for device, gb in DEVICES_GB.items():
        usable = (gb - RESERVED_GB) * 1024 ** 3
        fits[device] = {"fits": total <= usable, "needs_gb": round(total / 1024 ** 3, 3),
                        "usable_gb": round(usable / 1024 ** 3, 1)}
    return {"weights_bytes": weights, "kv_cache_bytes": kv, "activations_bytes": act, "total_bytes": total,
            "max_context": ctx, "devices": fits}


def inspect_export(directory: str | Path) -> dict:
    from tgedge.fileio import sha256_files
    from tgedge.runtime.manifest import Manifest, TensorMeta, io_differences

    manifest = Manifest.load(directory)
    graphs, mismatches = {}, []
    for name, entry in manifest.graphs.items():
        g = graphs[name] = inspect_onnx(manifest.graph_path(name))
        for kind, listed, actual in (("inputs", entry.inputs, g.inputs), ("outputs", entry.outputs, g.outputs)):
            diff = io_differences(listed, [TensorMeta.from_dict(t) for t in actual], full_shape=True)
            if diff:
                mismatches.append(f"{name} {kind} differ from manifest.json: {', '.join(diff)}")
        if g.precision != entry.precision:
            mismatches.append(f"{name}: manifest says {entry.precision}, graph looks {g.precision}")
        if g.opset != manifest.opset:  # what TensorRT and the memory estimate are told the graphs need
            mismatches.append(f"{name}: manifest.json says opset {manifest.opset}, {entry.file} imports opset {g.opset}")
        files = manifest.graph_files(name)  # what Manifest.verify hashes: graph, its weights, the weights it shares
        if not entry.sha256:  # null or missing: not checkable, and not to be reported as matching
            mismatches.append(f"{name}: {entry.file} has no sha256 in manifest.json, so it cannot be checked")
        elif sha256_files(files) != entry.sha256:
            mismatches.append(f"{name}: {entry.file} changed since it was written (sha256 differs from manifest.json)")
    mismatches += manifest.file_problems()
    return {"directory": str(directory), "tgedge_version": manifest.tgedge_version, "opset": manifest.opset,
            "graphs": {k: v.to_dict() for k, v in graphs.items()}, "engines": manifest.engines,
            "memory": memory_estimate(manifest, graphs), "mismatches": mismatches}


def summarize_layers(info: dict) -> dict:
    """TensorRT engine inspector JSON (ProfilingVerbosity.DETAILED) -> layer count, precisions, tactics."""
    layers = info.get("Layers", [])
    precisions: Counter = Counter()
    tactics: Counter = Counter()
    rows = []
    for layer in layers:
        if isinstance(layer, str):  # LAYER_NAMES_ONLY verbosity
            rows.append({"name": layer})
            continue
        outs = layer.get("Outputs", [])
        fmt = outs[0].get("Format/Datatype", "") if outs else ""
        precision = next((p for p in ("Int8", "FP16", "BF16", "FP8", "Int4", "FP32", "Int32", "Bool")
                          if p.lower() in fmt.lower()), "?")
        precisions[precision] += 1
        tactic = layer.get("TacticName") or layer.get("TacticValue") or ""
        if tactic:
            tactics[str(tactic)] += 1
        rows.append({"name": layer.get("Name"), "type": layer.get("LayerType"), "precision": precision,
                     "tactic": tactic})
    return {"layers": len(layers), "precisions": dict(precisions), "tactics": dict(tactics.most_common(10)),
            "per_layer": rows}


# The first 4 bytes of a serialised engine: TensorRT's plans ("ftrt"; "ptrt" for the safety runtime) and
# TensorRT for RTX's ("vtrt", seen on engines built by tensorrt-rtx 1.x).
ENGINE_TAGS = (b"ftrt", b"ptrt", b"vtrt")


def inspect_engine(path: str | Path) -> dict:
    from tgedge.runtime.manifest import MANIFEST, is_export

    path = Path(path)
    if not path.exists():
        raise TgedgeError(f"{path}: {absent(path, 'file')}")
    regular_file(path, "engine file")
    size = path.stat().st_size
    if size < 1024:
        raise TgedgeError(f"{path}: not a TensorRT engine, or truncated ({size} bytes)")
    with open(path, "rb") as f:
        tag = f.read(4)
    if tag not in ENGINE_TAGS:  # checked here: without a GPU TensorRT cannot deserialise even a good engine
        raise TgedgeError(f"{path}: not a TensorRT engine (starts with {tag!r}; TensorRT plans start with "
                          f"{' or '.join(repr(t) for t in ENGINE_TAGS)})")
    out: dict = {"path": str(path), "bytes": size, "metadata": None, "layers": None}
    if is_export(path.parent):
        engines = read_config_json(path.parent / MANIFEST).get("engines", {})
        if not isinstance(engines, dict) or not all(isinstance(m, dict) for m in engines.values()):
            raise TgedgeError(f"{path.parent / MANIFEST}: engines must be an object of objects (got {engines!r:.40})")
        out["metadata"] = next((m for m in engines.values() if m.get("file") == path.name), None)
    meta = out["metadata"] or {}
    try:
        from tgedge.runtime.tensorrt import check_engine, device_info, import_tensorrt

        trt = import_tensorrt(meta.get("backend", "tensorrt"))
        check_engine(path.stem, meta, trt.__version__, device_info()) if meta else None
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise TgedgeError(f"{path}: TensorRT cannot load it (not an engine for this TensorRT, or truncated)")
        inspector = engine.create_engine_inspector()
        out["layers"] = summarize_layers(json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON)))
    except TgedgeError as e:
        out["layers_unavailable"] = str(e)
    return out


def inspect_path(path: str | Path) -> dict:
    """Dispatch on what PATH is: an export/engine directory, an ONNX file, or a TensorRT engine."""
    path = Path(path)
    if path.is_dir():
        return {"kind": "export", **inspect_export(path)}
    if not path.exists():
        raise TgedgeError(f"{path}: {absent(path, 'file')}")
    if path.suffix in (".engine", ".plan", ".trt"):
        return {"kind": "engine", **inspect_engine(path)}
    return {"kind": "onnx", **inspect_onnx(path).to_dict()}
