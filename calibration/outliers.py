"""Outlier channels in fp32 beside the int8 MatMul: LLM.int8()'s mixed-precision decomposition, as Q/DQ graphs.

Where a MatMul input X has a few channels far larger than the rest (trained LLMs' and ViTs' outlier features;
`tgedge checkpoint random` plants them), per-tensor int8 of X spends its range on those few and the many others lose
their bits, and SmoothQuant can only move the difficulty into the weights. Dettmers et al. (2022) compute the outlier
dimensions in 16 bits and the rest in int8: X W = X_o W_o + X_r W_r. Here in plain ONNX ops, which TensorRT parses:

    X_r = Mul(X, mask)                  mask: 1 on the regular channels, 0 on the outliers
    Y_r = MatMul(X_r, W_r)              W_r: W with the outlier rows zeroed; quantised (Q/DQ) as every MatMul
    X_o = Gather(X, outliers, axis=-1)
    Y_o = MatMul(X_o, W_o)              W_o: W's outlier rows (k x N); kept fp32
    Y   = Add(Y_r, Y_o)

onnxruntime's Q/DQ also quantises each MatMul's output: Y_r takes Y's calibrated range (Y_r = Y - Y_o, and Y_o is a
few channels' share), so that no second pass is needed for it either. An outlier channel is one whose calibrated max |x| is at least `OUTLIER_RATIO` times the median channel's (the rule
`--smooth auto` and `tgedge checkpoint stats` use). X_r's per-tensor range is its regular channels' largest, known
from the same per-channel maxima: no second calibration pass. The fp32 part costs k / C of the MatMul (4 of 896
channels on the 0.5 B realistic preset). Inputs come from `tgedge.calibration.smooth.groups` (the MatMuls that read
them own their weights), so the rewrite never touches a weight another node reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tgedge.calibration.smooth import MIN_SCALE, OUTLIER_RATIO, groups

MAX_SHARE = 1 / 16  # at most this share of an input's channels go fp32 (the largest ones): outliers are a few


@dataclass
class Split:
    """One input computed in two parts."""
    tensor: str  # the input as exported
    regular: str  # X_r: what the int8 MatMuls read now
    channels: list[int]  # the outlier channels, computed in fp32
    fp32_nodes: list[str]  # the MatMuls of the outlier part: to keep out of int8
    outputs: dict[str, str]  # the int8 MatMuls' outputs (Y_r) -> the output each had (Y), whose measured range it takes


def outlier_channels(absmax: np.ndarray, ratio: float = OUTLIER_RATIO) -> np.ndarray:
    """The channels whose max |x| is >= `ratio` x the median channel's, the largest `MAX_SHARE` of them at most."""
    a = np.asarray(absmax, np.float64)
    found = np.flatnonzero(a >= ratio * max(float(np.median(a)), MIN_SCALE))
    limit = max(1, int(a.size * MAX_SHARE))
    if found.size > limit:
        found = found[np.argsort(-a[found], kind="stable")[:limit]]
    return np.sort(found)


def split(proto: onnx.ModelProto, absmax: dict[str, np.ndarray], skip: set[str] = frozenset(),
          ratio: float = OUTLIER_RATIO) -> dict[str, Split]:
    """Rewrite `proto` (loaded: weights in memory) in place so that each input in `absmax` (per-channel max |x|)
    with outlier channels is computed as above. MatMuls named in `skip` (kept fp32 anyway) leave their input alone.
    Returns tensor -> Split."""
    inits = {t.name: t for t in proto.graph.initializer}
    todo: dict[str, tuple] = {}
    for g in groups(proto):
        if g.tensor in absmax and not any(n in skip for n, _ in g.matmuls):
            idx = outlier_channels(absmax[g.tensor], ratio)
            if idx.size:
                todo[g.tensor] = (g, idx)
    if not todo:
        return {}
    before: dict[str, list[onnx.NodeProto]] = {}  # reader -> nodes that go before it (the mask and the gather)
    after: dict[str, list[onnx.NodeProto]] = {}  # reader -> the fp32 MatMul and the Add
    rewired: dict[str, tuple[str, str]] = {}  # reader -> (its new input, its new output)
    done = {}
    for t, (g, idx) in todo.items():
        w0 = numpy_helper.to_array(inits[g.matmuls[0][1]])
        mask = np.ones(g.channels, w0.dtype)
        mask[idx] = 0
        regular, outliers = f"{t}_regular", f"{t}_outliers"
        proto.graph.initializer.extend([numpy_helper.from_array(mask, f"{t}_regular_mask"),
                                        numpy_helper.from_array(idx.astype(np.int64), f"{t}_outlier_index")])
        first = g.matmuls[0][0]
        before[first] = [
            helper.make_node("Mul", [t, f"{t}_regular_mask"], [regular], name=f"{t}_regular_mask/Mul"),
            helper.make_node("Gather", [t, f"{t}_outlier_index"], [outliers], name=f"{t}_outlier_index/Gather",
                             axis=-1)]
        fp32, outputs = [], {}
        for node, w_name in g.matmuls:
            w = numpy_helper.to_array(inits[w_name]).copy()
            rows = w[idx].copy()
            w[idx] = 0
            inits[w_name].CopyFrom(numpy_helper.from_array(w, w_name))
            proto.graph.initializer.append(numpy_helper.from_array(rows, f"{w_name}_outlier_rows"))
            out = _output(proto, node)
            rewired[node] = (regular, f"{out}_regular")
            outputs[f"{out}_regular"] = out
            name = f"{node}_outlier_channels"
            after[node] = [helper.make_node("MatMul", [outliers, f"{w_name}_outlier_rows"], [f"{out}_outliers"],
                                            name=name),
                           helper.make_node("Add", [f"{out}_regular", f"{out}_outliers"], [out],
                                            name=f"{node}_outlier_channels/Add")]
            fp32.append(name)
        done[t] = Split(t, regular, [int(i) for i in idx], fp32, outputs)
    nodes = []
    for n in proto.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        if n.name in rewired:
            copy.input[0], copy.output[0] = rewired[n.name]
        nodes += before.get(n.name, []) + [copy] + after.get(n.name, [])
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return done


def _output(proto: onnx.ModelProto, node: str) -> str:
    return next(n.output[0] for n in proto.graph.node if n.name == node)


def regular_ranges(splits: dict[str, Split], absmax: dict[str, np.ndarray]) -> dict[str, float]:
    """X_r's symmetric per-tensor range for each split input: its regular channels' largest max |x|."""
    out = {}
    for t, s in splits.items():
        a = np.asarray(absmax[t], np.float64).copy()
        a[s.channels] = 0
        out[s.regular] = float(a.max())
    return out
