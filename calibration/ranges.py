"""Min/max calibration that streams: ranges folded while the fp32 export answers, no activation or feed kept.

onnxruntime's calibrators run recorded feeds through a copy of each graph that outputs what they measure; the
feeds of a whole calibration set (the decoder's include its KV cache at every step) and the copies of the graph
are what grew past 12 GiB on a 1 B model. Min/max needs neither: each graph is loaded once, with a ReduceMin and
a ReduceMax on every tensor onnxruntime's quantizer will ask a range for (the inputs and outputs of MatMul /
Gemm / Conv, as its `MinMaxCalibrater` selects them), the pipeline answers the calibration samples through those
graphs, and each call folds its scalars into a running minimum and maximum. The result is onnxruntime's own
`TensorsData` (symmetric, as `ActivationSymmetric` makes it), the same numbers its strided min/max calibration
gives on the same feeds (tested), which `quantize_static` then reads as its calibration cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tgedge.runtime.backends import make_runner
from tgedge.runtime.runner import BaseRunner

REDUCTIONS = ("ReduceMin", "ReduceMax")
CHANNEL_OUTPUTS = (("ChannelAbsMax", TensorProto.FLOAT), ("ChannelSumSq", TensorProto.FLOAT), ("Rows", TensorProto.INT64))


def calibrated_tensors(structure: onnx.ModelProto, op_types: tuple[str, ...]) -> list[str]:
    """The tensors onnxruntime's calibrator measures: float inputs and outputs of `op_types` nodes, not weights."""
    inferred = onnx.shape_inference.infer_shapes(structure)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    weights = {t.name for t in structure.graph.initializer}
    return sorted({t for n in structure.graph.node if n.op_type in op_types for t in [*n.input, *n.output]
                   if t and t not in weights and types.get(t) in (TensorProto.FLOAT, TensorProto.FLOAT16)})


def with_reductions(structure: onnx.ModelProto, tensors: list[str],
                    channels: dict[str, int] | None = None) -> onnx.ModelProto:
    """`structure` plus the outputs `<tensor>_ReduceMin` / `<tensor>_ReduceMax` (keepdims: an empty tensor reduces).

    Each reduction goes right after the node that makes its tensor, and the session runs the nodes in that order
    (`SessionFromOnnx(in_order=True)`): in onnxruntime's default order the reductions ran at the end and kept every
    measured activation alive until then (a ViT-L/336 batch of five views: 11.2 GiB peak against 1.5 GiB for the
    graph alone; in order: 1.5 GiB).

    `channels`: tensor -> its channel count (the last axis): tensors also reduced per channel over every other axis
    (reshaped to (rows, channels): no shape inference, which stops at the contrib ops of the static-cache decoder and
    once left its 47 fused norm outputs unmeasured): `<tensor>_ChannelAbsMax`
    (max |x|: SmoothQuant's), `<tensor>_ChannelSumSq` (sum of x^2: AWQ-style scales) and `<tensor>_Rows` (how many
    rows the sum is over), for `tgedge.calibration.smooth`."""
    wanted, per_channel = set(tensors), dict(channels or {})
    opset = next((o.version for o in structure.opset_import if o.domain in ("", "ai.onnx")), 17)
    if per_channel and opset >= 18:  # ReduceMax takes its axes as an input from opset 18
        structure.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "tgedge_axis0"))
    for c in sorted(set(per_channel.values())):
        structure.graph.initializer.append(numpy_helper.from_array(np.array([-1, c], np.int64), f"tgedge_rows_{c}"))

    def channel_max(t: str) -> list[onnx.NodeProto]:
        flat = helper.make_node("Reshape", [f"{t}_Abs", f"tgedge_rows_{per_channel[t]}"], [f"{t}_Flat"],
                                name=f"{t}_Flat")
        def over_rows(op: str, source: str, out: str) -> onnx.NodeProto:
            if opset >= 18:
                return helper.make_node(op, [source, "tgedge_axis0"], [out], keepdims=0, name=out)
            return helper.make_node(op, [source], [out], keepdims=0, axes=[0], name=out)

        return [helper.make_node("Abs", [t], [f"{t}_Abs"], name=f"{t}_Abs"), flat,
                over_rows("ReduceMax", f"{t}_Flat", f"{t}_ChannelAbsMax"),
                over_rows("ReduceSumSquare", f"{t}_Flat", f"{t}_ChannelSumSq"),
                helper.make_node("Shape", [f"{t}_Flat"], [f"{t}_Rows"], end=1, name=f"{t}_Rows")]

    def reductions(names) -> list[onnx.NodeProto]:
        out = [helper.make_node(op, [t], [f"{t}_{op}"], keepdims=1, name=f"{t}_{op}")
               for t in names if t in wanted for op in REDUCTIONS]
        return out + [n for t in names if t in per_channel for n in channel_max(t)]

    nodes = reductions([i.name for i in structure.graph.input])
    for node in structure.graph.node:
        nodes += [node, *reductions(node.output)]
    del structure.graph.node[:]
    structure.graph.node.extend(nodes)
    for t in tensors:
        for op in REDUCTIONS:
            structure.graph.output.append(helper.make_tensor_value_info(f"{t}_{op}", TensorProto.FLOAT, None))
    for t in per_channel:
        for name, dtype in CHANNEL_OUTPUTS:
            structure.graph.output.append(helper.make_tensor_value_info(f"{t}_{name}", dtype, None))
    return structure


class MinMaxRunner(BaseRunner):
    """A graph's runner that also folds the min/max of every calibrated tensor of each call; callers see only the
    graph's own outputs. It wraps the onnxruntime runner `make_runner` gives for the graph with the reductions added
    (`rewrite`), its nodes run in order."""

    def __init__(self, manifest, graph: str, op_types: tuple[str, ...], per_channel: bool = False):
        """`per_channel`: also fold, per channel of the inputs `tgedge.calibration.smooth` can fold scales into, max |x|
        (`channel_absmax`) and the sum of x^2 over `channel_rows` rows (`channel_sumsq`)."""
        super().__init__(graph)
        self.tensors: list[str] = []
        self.channels: dict[str, int] = {}  # tensor -> channel count

        def rewrite(structure: onnx.ModelProto) -> onnx.ModelProto:
            from tgedge.calibration.smooth import groups

            self.tensors = calibrated_tensors(structure, op_types)
            self.channels = {g.tensor: g.channels for g in groups(structure)} if per_channel else {}
            return with_reductions(structure, self.tensors, self.channels)

        self.runner = make_runner("onnxruntime", manifest, graph, rewrite=rewrite, in_order=True)
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}
        self.channel_absmax: dict[str, np.ndarray] = {}
        self.channel_sumsq: dict[str, np.ndarray] = {}  # float64 sums of x^2 per channel, over `channel_rows` rows
        self.channel_rows: dict[str, int] = {}

    def activate_impl(self) -> None:
        self.runner.activate()
        added = {f"{t}_{op}" for t in self.tensors for op in REDUCTIONS} | \
            {f"{t}_{name}" for t in self.channels for name, _ in CHANNEL_OUTPUTS}
        self.graph_outputs = [n for n in self.runner.get_output_metadata() if n not in added]

    def deactivate_impl(self) -> None:
        self.runner.deactivate()

    def describe_value(self, value: Any):
        return self.runner.describe_value(value)

    # a static KV cache's buffers stay bound in place, as on the plain runner
    def buffer(self, shape: tuple[int, ...], dtype: str):
        return self.runner.buffer(shape, dtype)

    def bind(self, buffers: dict[str, Any], outputs: dict[str, str]):
        return self.runner.bind(buffers, outputs)

    def get_input_metadata_impl(self):
        return self.runner.get_input_metadata()

    def get_output_metadata_impl(self):
        return {n: m for n, m in self.runner.get_output_metadata().items() if n in self.graph_outputs}

    def infer_impl(self, feed: dict[str, Any], **kwargs) -> dict[str, Any]:
        out = self.runner.infer(feed, check_inputs=False, **kwargs)  # checked once, here, against the same inputs
        for t in self.tensors:
            low, high = out[f"{t}_ReduceMin"], out[f"{t}_ReduceMax"]
            if low.size:  # an empty tensor has no range; NaN is skipped (onnxruntime's nanmin / nanmax)
                self.low[t] = float(np.fmin.reduce(low.ravel(), initial=self.low.get(t, np.inf)))
                self.high[t] = float(np.fmax.reduce(high.ravel(), initial=self.high.get(t, -np.inf)))
        for t in self.channels:
            m = out.get(f"{t}_ChannelAbsMax")
            if m is None or not m.size or not int(out[f"{t}_Rows"][0]):
                continue
            m = np.nan_to_num(m.astype(np.float64), nan=0.0)
            self.channel_absmax[t] = m if t not in self.channel_absmax else np.maximum(self.channel_absmax[t], m)
            sq = np.nan_to_num(out[f"{t}_ChannelSumSq"].astype(np.float64), nan=0.0)
            self.channel_sumsq[t] = sq + self.channel_sumsq.get(t, 0.0)
            self.channel_rows[t] = int(out[f"{t}_Rows"][0]) + self.channel_rows.get(t, 0)
        return {n: out[n] for n in self.graph_outputs}

    def tensors_data(self):
        """onnxruntime's `TensorsData`: symmetric ranges (-m, m), m = max |value| seen, as float32 arrays of one."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

        ranges = {}
        for t in self.tensors:
            if t in self.low:
                m = np.array([max(abs(self.low[t]), abs(self.high[t]))], dtype=np.float32)
                ranges[t] = (-m, m)
        return TensorsData(CalibrationMethod.MinMax, ranges)
