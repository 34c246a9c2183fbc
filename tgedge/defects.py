"""Planted defects: an export copied with one bug of the kind exporters make, to prove that a gate catches it.

A drift gate is only worth its limits if it passes correct exports *and* fails wrong ones on weights like a trained
model's. Each defect here is a mistake seen in real exporters, planted in the graph's own bytes (the manifest is
re-written to match, as a buggy exporter would write it, so only the figures can tell):

- `decoder-mlp`: 5 % on an eighth of one decoder MLP weight (the middle layer's down projection, its first eighth of
  output columns): a mis-converted shard.
- `rms-eps`: every decoder RMSNorm epsilon 1e-5 <-> 1e-6 (LLaMA's and Qwen2's, mixed up).
- `qkv-bias`: the decoder's q/k/v biases dropped (zero): Qwen2's attention biases ignored.
- `vision-transpose`: one vision layer's query weight transposed (the middle layer's).

`plant(export_dir, out, defect)` writes the copy; `scripts/plant_defect.py` is its command line.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tgedge.errors import TgedgeError
from tgedge.runtime.manifest import Manifest

DEFECTS = {"decoder-mlp": "decoder", "rms-eps": "decoder", "qkv-bias": "decoder", "vision-transpose": "vision"}


class _Tensors:
    """Initializers of one graph read and written in place: inline ones in the graph, external ones in their file."""

    def __init__(self, path: Path):
        self.path, self.proto = path, onnx.load(str(path), load_external_data=False)
        self.by_name = {t.name: t for t in self.proto.graph.initializer}
        self.inline_changed = False

    def read(self, name: str) -> np.ndarray:
        t = self.by_name[name]
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t).copy()
        ext = {e.key: e.value for e in t.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        with open(self.path.parent / ext["location"], "rb") as f:
            f.seek(int(ext.get("offset", 0)))
            data = f.read(int(ext["length"]))
        return np.frombuffer(data, dtype).reshape(tuple(t.dims)).copy()

    def write(self, name: str, value: np.ndarray) -> None:
        t = self.by_name[name]
        value = np.array(value, onnx.helper.tensor_dtype_to_np_dtype(t.data_type), order="C")  # 0-d stays 0-d
        if tuple(value.shape) != tuple(t.dims):
            raise TgedgeError(f"{name}: a defect must keep the shape {tuple(t.dims)}")
        if t.data_location != onnx.TensorProto.EXTERNAL:
            t.CopyFrom(numpy_helper.from_array(value, name))
            self.inline_changed = True
            return
        ext = {e.key: e.value for e in t.external_data}
        with open(self.path.parent / ext["location"], "r+b") as f:  # the copy's file, never the export's
            f.seek(int(ext.get("offset", 0)))
            f.write(value.tobytes())

    def save(self) -> None:
        onnx.save_model(self.proto, str(self.path))  # external references kept as they are


def _node(proto: onnx.ModelProto, pattern: str, op: str) -> onnx.NodeProto:
    found = [n for n in proto.graph.node if n.op_type == op and re.search(pattern, n.name)]
    if not found:
        raise TgedgeError(f"no {op} node matching {pattern!r}: this export's graph is not laid out as expected")
    return found[0]


def _weight_of(tensors: _Tensors, node: onnx.NodeProto) -> str:
    names = [i for i in node.input if i in tensors.by_name]
    if not names:
        raise TgedgeError(f"{node.name} has no constant weight")
    return names[0]


def _layers(proto: onnx.ModelProto, scope: str) -> int:
    found = {int(m.group(1)) for n in proto.graph.node if (m := re.search(scope + r"layers\.(\d+)/", n.name))}
    if not found:
        raise TgedgeError(f"no layers under {scope!r} in this graph")
    return max(found) + 1


def _decoder_mlp(t: _Tensors) -> str:
    mid = _layers(t.proto, "/") // 2
    name = _weight_of(t, _node(t.proto, rf"/layers\.{mid}/mlp/down_proj/", "MatMul"))
    w = t.read(name)  # (intermediate, hidden): x @ W
    w[:, : max(1, w.shape[1] // 8)] *= 1.05
    t.write(name, w)
    return f"layer {mid} down_proj: 5 % on {max(1, w.shape[1] // 8)} of {w.shape[1]} output columns"


def _swap_eps(eps: float) -> float:
    return 1e-6 if abs(eps - 1e-5) < 1e-9 else 1e-5


def _rms_eps(t: _Tensors) -> str:
    changed, before = 0, set()
    for n in t.proto.graph.node:
        for a in n.attribute:
            if a.name == "epsilon" and n.op_type.endswith("SimplifiedLayerNormalization"):
                before.add(a.f)
                a.f = _swap_eps(a.f)
                changed += 1
                t.inline_changed = True
        if n.op_type == "Add" and re.search(r"norm/Add$", n.name):
            for i in n.input:
                if i.endswith("/eps") and i in t.by_name:
                    eps = float(t.read(i))
                    before.add(eps)
                    t.write(i, np.array(_swap_eps(eps), np.float32))
                    changed += 1
    if not changed:
        raise TgedgeError("no RMSNorm epsilon found in the decoder graph")
    return f"{changed} norms: epsilon {sorted(before)} -> {sorted({_swap_eps(e) for e in before})}"


def _qkv_bias(t: _Tensors) -> str:
    names = [_weight_of(t, n) for n in t.proto.graph.node
             if n.op_type == "Add" and re.search(r"/self_attn/(q|k|v|qkv)_proj/Add$", n.name)
             and any(i in t.by_name for i in n.input)]
    if not names:
        raise TgedgeError("this decoder has no q/k/v bias to drop (a LLaMA decoder has none)")
    for name in names:
        t.write(name, np.zeros_like(t.read(name)))
    return f"{len(names)} q/k/v biases zeroed"


def _vision_transpose(t: _Tensors) -> str:
    scope = next((m.group(0) for n in t.proto.graph.node if (m := re.search(r"^/.*?encoder/", n.name))), None)
    if scope is None:
        raise TgedgeError("no vision encoder layers in this graph")
    mid = _layers(t.proto, re.escape(scope)) // 2
    name = _weight_of(t, _node(t.proto, rf"encoder/layers\.{mid}/self_attn/q_proj/", "MatMul"))
    w = t.read(name)
    if w.shape[0] != w.shape[1]:
        raise TgedgeError(f"{name} is not square {w.shape}: cannot be transposed in place")
    t.write(name, w.T)
    return f"layer {mid} q_proj weight {w.shape} transposed"


PLANT = {"decoder-mlp": _decoder_mlp, "rms-eps": _rms_eps, "qkv-bias": _qkv_bias, "vision-transpose": _vision_transpose}


def plant(export_dir: str | Path, out: str | Path, defect: str) -> str:
    """Copy the fp32 export `export_dir` to `out` (which must not exist) with `defect` planted in its graph and the
    manifest re-written to match. Returns what was changed."""
    from tgedge.calibration.quantize import graph_entry

    if defect not in DEFECTS:
        raise TgedgeError(f"unknown defect {defect!r} (choose from {', '.join(DEFECTS)})")
    src, out = Path(export_dir), Path(out)
    if out.exists():
        raise TgedgeError(f"{out} exists: the defect's copy must be a new directory")
    manifest = Manifest.load(src)
    graph = DEFECTS[defect]
    if graph not in manifest.graphs:
        raise TgedgeError(f"{src} has no {graph} graph")
    shutil.copytree(src, out)
    try:
        copy = Manifest.load(out)
        entry = copy.graphs[graph]
        tensors = _Tensors(copy.graph_path(graph))
        what = PLANT[defect](tensors)
        if tensors.inline_changed:
            tensors.save()
        copy.graphs[graph] = graph_entry(entry, entry.precision, copy.graph_path(graph))
        copy.save(out)
    except BaseException:
        shutil.rmtree(out)
        raise
    return what
