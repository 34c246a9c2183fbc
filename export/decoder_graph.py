"""The decoder and embed graphs written directly from the config, weights streamed from the checkpoint.

What onnxruntime-genai's builder and TensorRT Edge-LLM's exporter do for LLMs: no tracing, so no second copy of the
model in memory. Each weight is read from the checkpoint (`tgedge.weights.LazyWeights`), converted to the export
dtype, written to the external data file and dropped: peak memory is one tensor plus the graph's structure.

The graph computes what `tgedge.model.graphs.DecoderGraph` computes (it is checked against it), op for op:
RMSNorm in fp32, SwiGLU, and logits for the **last position only** (prefill needs no more; validate teacher-forces
step by step). A tied embedding table is stored once: the embed graph holds it and the decoder's LM head (`Gemm` with
`transB`) reads the same bytes of `embed.onnx.data`. Attention is one of two named variants, by the contract's KV cache
mode:

- `growing` (`GrowingAttention`): RoPE from position ids, grouped-query attention as MatMul/Softmax (softmax in fp32)
  over past + new keys, present = Concat(past, new). Standard ONNX ops, opset 17: any backend runs it.
- `static` (`StaticAttention`): onnxruntime's `com.microsoft.GroupQueryAttention` (onnxruntime-genai's builder) over
  one buffer per layer at max context that the runtime binds as both past and present: the kernel writes the step's
  keys and values in place and attends over the positions `seqlens_k` says are filled; q, k and v come from one
  packed projection, RoPE is the kernel's (cos/sin tables of max context), and each residual Add with the RMSNorm
  after it is one `com.microsoft.SkipSimplifiedLayerNormalization` (`Residual`). onnxruntime CPU and CUDA run it.
- `static-onnx` (`OnnxStaticAttention`): the same buffers and runtime contract in standard ONNX ops, opset 24: the
  step's keys and values written in place by `TensorScatter` (TensorRT's KVCacheUpdate layer; onnxruntime writes in
  place when the buffer is bound as both past and present), attention by `Attention` (TensorRT's attention layer)
  over the filled positions. TensorRT with KVCacheUpdate (10.15+ per its docs; TensorRT for RTX 1.7 tested here, built
  not run) and onnxruntime with TensorScatter (tested: 1.32) run it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from tgedge.calibration.weight_only import WeightOnly, nbits_attributes, nbits_blocks
from tgedge.contract import StageContract
from tgedge.errors import TgedgeError, TgedgeInternalError
from tgedge.model.decoder import rope_inv_freq

# by numpy name: the export precision's `float_dtype` (tgedge/precision.py)
DTYPES = {"float32": (TensorProto.FLOAT, torch.float32), "float16": (TensorProto.FLOAT16, torch.float16)}
ALIGN = 64  # bytes; external tensors start aligned so that a memory map can use them in place


class WeightStore:
    """Initializers of one graph: inline (small graphs) or streamed to an external data file, one at a time."""

    def __init__(self, directory: Path, data_file: str | None):
        self.directory, self.data_file = directory, data_file
        self.initializers: list[TensorProto] = []
        self.bytes = 0
        self._f = open(directory / data_file, "wb") if data_file else None

    def add(self, name: str, tensor: torch.Tensor, elem_type: int) -> str:
        """A weight tensor (converted already), written and forgotten; returns its name in the graph."""
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.dtype == torch.bfloat16 \
            else tensor.contiguous().numpy().tobytes()
        proto = TensorProto(name=name, data_type=elem_type, dims=list(tensor.shape))
        if self._f is None:
            proto.raw_data = data
        else:
            offset = self._write(data)
            self._external(proto, self.data_file, offset, len(data))
        self.initializers.append(proto)
        self.bytes += len(data)
        return name

    def place(self, proto: TensorProto, data: bytes | memoryview) -> None:
        """Bytes of an initializer declared elsewhere, written to the external data file (aligned)."""
        self._external(proto, self.data_file, self._write(data), len(data))
        self.bytes += len(data)

    def share(self, name: str, source: TensorProto) -> str:
        """The same bytes as an initializer of another graph (its external file): stored once."""
        proto = TensorProto(name=name, data_type=source.data_type, dims=list(source.dims))
        if source.HasField("raw_data"):
            proto.raw_data = source.raw_data
        else:
            proto.data_location = TensorProto.EXTERNAL
            proto.external_data.extend(source.external_data)
        self.initializers.append(proto)
        return name

    def _write(self, data: bytes) -> int:
        pad = -self._f.tell() % ALIGN
        self._f.write(b"\0" * pad)
        offset = self._f.tell()
        self._f.write(data)
        return offset

    @staticmethod
    def _external(proto: TensorProto, location: str, offset: int, length: int) -> None:
        proto.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            proto.external_data.add(key=k, value=v)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class GraphWriter:
    """Nodes with unique names under a module path (`/layers.3/self_attn/q_proj/MatMul`), as a traced graph has.
    `weight_only` (int4w / int8w): linear layers' weights written as onnxruntime's MatMulNBits blocks (symmetric,
    its block size and accuracy level), what `tgedge quantize --precision int4w|int8w` makes, one tensor at a time."""

    def __init__(self, store: WeightStore, dtype: str, weight_only: WeightOnly | None = None, opset: int = 17):
        self.store, self.nodes, self.consts, self.opset = store, [], [], opset
        self.elem, self.torch_dtype = DTYPES[dtype]
        self.weight_only = weight_only
        self._names: set[str] = set()

    def op(self, op_type: str, inputs: list[str], scope: str, outputs: int = 1, names: list | None = None,
           **attrs) -> str | list[str]:
        """`names`: output names to use instead of generated ones (None: generated; "": an optional output left
        out)."""
        name = f"{scope}/{op_type}"
        i = 0
        while name in self._names:
            i += 1
            name = f"{scope}/{op_type}_{i}"
        self._names.add(name)
        given = names or [None] * outputs
        outs = [f"{name}_output_{k}" if given[k] is None else given[k] for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, name: str, value: np.ndarray) -> str:
        self.consts.append(onnx.numpy_helper.from_array(value, name))
        return name

    def cast(self, x: str, to: int, scope: str) -> str:
        return x if to is None else self.op("Cast", [x], scope, to=to)


def _weight(w: GraphWriter, weights, name: str, transpose: bool = False) -> str:
    t = weights.raw(name)
    t = (t.t() if transpose else t).to(w.torch_dtype)
    return w.store.add(name + (".T" if transpose else ""), t, w.elem)


def _tensor(w: GraphWriter, name: str, t: torch.Tensor) -> str:
    return w.store.add(name, t.to(w.torch_dtype), w.elem)


def _nbits(w: GraphWriter, weight: torch.Tensor, x: str, name: str, scope: str) -> str:
    """x @ W^T with W (N, K) quantised block-wise along K by onnxruntime's own kernel (as its MatMulNBitsQuantizer
    does, and with the same attributes: `accuracy_level` only when not 0)."""
    q = w.weight_only
    packed, scales = nbits_blocks(weight.float().t().numpy(), q)
    n, k = weight.shape
    qname = w.store.add(f"{name}_Q{q.bits}", torch.from_numpy(packed), TensorProto.UINT8)
    sc = w.store.add(f"{name}_scales", torch.from_numpy(scales).to(w.torch_dtype), w.elem)
    return w.op("MatMulNBits", [x, qname, sc], scope, **nbits_attributes(q, k, n))


def _linear(w: GraphWriter, weights, x: str, prefix: str, scope: str, bias: bool) -> str:
    if w.weight_only:
        y = _nbits(w, weights.raw(f"{prefix}.weight"), x, f"{prefix}.weight", scope)
        if bias:
            y = w.op("Add", [y, _weight(w, weights, f"{prefix}.bias")], scope)
        return y
    y = w.op("MatMul", [x, _weight(w, weights, f"{prefix}.weight", transpose=True)], scope)
    if bias:
        y = w.op("Add", [y, _weight(w, weights, f"{prefix}.bias")], scope)
    return y


def _packed_linear(w: GraphWriter, weights, x: str, prefixes: list[str], name: str, scope: str, bias: bool) -> str:
    """One projection for several (q, k, v): their weights concatenated along the output dim as they stream."""
    weight = torch.cat([weights.raw(f"{p}.weight") for p in prefixes])  # (N_q + N_k + N_v, K)
    if w.weight_only:
        y = _nbits(w, weight, x, f"{name}.weight", scope)
    else:
        y = w.op("MatMul", [x, _tensor(w, f"{name}.weight.T", weight.t())], scope)
    del weight
    if bias:
        y = w.op("Add", [y, _tensor(w, f"{name}.bias", torch.cat([weights.raw(f"{p}.bias") for p in prefixes]))], scope)
    return y


def _rms_norm(w: GraphWriter, weights, x: str, name: str, eps: float, scope: str) -> str:
    """x * rsqrt(mean(x^2) + eps) in fp32, then back to the compute dtype and scaled (tgedge.model.common.RMSNorm)."""
    fp32 = w.elem != TensorProto.FLOAT
    xf = w.op("Cast", [x], scope, to=TensorProto.FLOAT) if fp32 else x
    square = w.op("Pow", [xf, "two_f32"], scope)
    var = w.op("ReduceMean", [square], scope, axes=[-1], keepdims=1) if w.opset < 18 else \
        w.op("ReduceMean", [square, "minus_one"], scope, keepdims=1)  # opset 18: the axes an input
    inv = w.op("Reciprocal", [w.op("Sqrt", [w.op("Add", [var, w.const(f"{scope}/eps", np.array(eps, np.float32))],
                                                  scope)], scope)], scope)
    y = w.op("Mul", [xf, inv], scope)
    y = w.op("Cast", [y], scope, to=w.elem) if fp32 else y
    return w.op("Mul", [_weight(w, weights, name), y], scope)


class Residual:
    """The residual stream: each sublayer's output is added to it, and it is normalised before the next sublayer.

    Standard ops: Add, then RMSNorm as `_rms_norm` writes it. `fused` (the onnxruntime-only graph, beside
    GroupQueryAttention): the Add and the RMSNorm after it are one `com.microsoft.SkipSimplifiedLayerNormalization`
    (onnxruntime-genai's form; its fourth output is the sum, the stream itself), a kernel in place of eight ops per
    norm. The first norm has nothing to add: it stays in standard ops (the contrib `SimplifiedLayerNormalization` is
    registered in the ONNX domain, which onnx's checker rejects)."""

    def __init__(self, w: GraphWriter, weights, x: str, eps: float, fused: bool):
        self.w, self.weights, self.x, self.eps, self.fused = w, weights, x, eps, fused
        self.pending: str | None = None  # fused: a sublayer's output, added by the next norm's kernel

    def add(self, y: str, scope: str) -> None:
        if not self.fused:
            self.x = self.w.op("Add", [self.x, y], scope)
        elif self.pending is not None:
            raise TgedgeInternalError("two sublayer outputs added without a norm between them")
        else:
            self.pending = y

    def norm(self, weight: str, scope: str, last: bool = False) -> str:
        """`last`: the stream ends here (the final norm): the kernel's sum output is left out."""
        w = self.w
        if self.pending is None:
            return _rms_norm(w, self.weights, self.x, weight, self.eps, scope)
        out, _, _, self.x = w.op("SkipSimplifiedLayerNormalization",
                                 [self.x, self.pending, _weight(w, self.weights, weight)], scope, outputs=4,
                                 names=[None, "", "", "" if last else None], domain="com.microsoft",
                                 epsilon=self.eps)
        self.pending = None
        return out


def _rotate(w: GraphWriter, x: str, cos: str, sin: str, scope: str) -> str:
    x1, x2 = w.op("Split", [x, "half_split"], scope, outputs=2, axis=-1)
    rotated = w.op("Concat", [w.op("Neg", [x2], scope), x1], scope, axis=-1)
    return w.op("Add", [w.op("Mul", [x, cos], scope), w.op("Mul", [rotated, sin], scope)], scope)


class GrowingAttention:
    """Standard ops: RoPE from `position_ids`, scores over Concat(past, new) with a causal + padding mask."""
    FUSED_NORMS = False  # standard ops: any backend
    OPSET = 17  # the decoder graph's: what JetPack 6's TensorRT 10.3 parses

    def __init__(self, w: GraphWriter, d, contract: StageContract):
        self.d, self.past = d, contract.cache.past_names()
        hd, h, hkv = d.head_dim, d.num_heads, d.num_kv_heads
        w.const("zero_i", np.array(0, np.int64))
        w.const("one_i", np.array(1, np.int64))
        # RoPE angles from the positions: (B, S, D/2) -> cos, sin (B, 1, S, D)
        inv_freq = w.const("rope/inv_freq", rope_inv_freq(d).numpy().astype(np.float32))
        pos = w.op("Cast", [self._position_ids(w)], "/rope", to=TensorProto.FLOAT)
        freqs = w.op("Mul", [w.op("Unsqueeze", [pos, "minus_one"], "/rope"), inv_freq], "/rope")
        emb = w.op("Concat", [freqs, freqs], "/rope", axis=-1)
        self.cos, self.sin = (w.op("Unsqueeze", [w.cast(w.op(f, [emb], "/rope"), w.elem if w.elem != TensorProto.FLOAT
                                                        else None, "/rope"), "axis1"], "/rope") for f in ("Cos", "Sin"))
        # additive mask (B, 1, S, P+S): causal over past + new positions, and the attention mask's padding
        p, total, q_idx = self._indices(w)
        k_idx = w.op("Range", ["zero_i", total, "one_i"], "/mask")
        causal = self._causal(w, k_idx, q_idx)
        padded = w.op("Greater", ["attention_mask", w.const("zero_mask", np.array(0, np.int64))], "/mask")
        padded = w.op("Unsqueeze", [padded, w.const("axes12", np.array([1, 2], np.int64))], "/mask")
        allowed = w.op("And", [causal, padded], "/mask")
        np_dt = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}.get(w.elem, np.float32)
        lowest = torch.finfo(w.torch_dtype).min
        self.mask = w.op("Where", [allowed, w.const("mask_zero", np.array(0, np_dt)),
                                   w.const("mask_min", np.array(lowest, np_dt))], "/mask")
        self.scale = w.const("attn_scale", np.array(math.sqrt(hd), np_dt))
        self.q_shape = w.const("q_shape", np.array([0, 0, h, hd], np.int64))
        self.kv_shape = w.const("kv_shape", np.array([0, 0, hkv, hd], np.int64))
        self.rep_shape = w.const("rep_shape", np.array([0, h, -1, hd], np.int64))
        self.out_shape = w.const("out_shape", np.array([0, 0, h * hd], np.int64))
        self.expand_axis = w.const("axis2", np.array([2], np.int64))

    def _position_ids(self, w: GraphWriter) -> str:
        return "position_ids"

    def _causal(self, w: GraphWriter, k_idx: str, q_idx: str) -> str:
        """Key positions (P+S,) against the new positions (S,): may attend, (S, P+S)."""
        return w.op("LessOrEqual", [w.op("Unsqueeze", [k_idx, w.const("axis0", np.array([0], np.int64))], "/mask"),
                                    w.op("Unsqueeze", [q_idx, "axis1"], "/mask")], "/mask")

    def _indices(self, w: GraphWriter) -> tuple[str, str, str]:
        """(positions cached P, P + S, the new positions P .. P+S-1) from the inputs' shapes."""
        seq = w.op("Gather", [w.op("Shape", ["inputs_embeds"], "/mask"), "one_i"], "/mask", axis=0)
        p = w.op("Gather", [w.op("Shape", [self.past[0]], "/mask"), w.const("two_i", np.array(2, np.int64))], "/mask",
                 axis=0)
        total = w.op("Add", [p, seq], "/mask")
        return p, total, w.op("Range", [p, total, "one_i"], "/mask")

    @staticmethod
    def constants(w: GraphWriter, d) -> None:
        """Its constants declared before the graph's shared ones (the initializer order of earlier exports)."""
        w.const("half_split", np.array([d.head_dim // 2, d.head_dim // 2], np.int64))

    def _heads(self, w: GraphWriter, weights, a: str, pre: str, sa: str) -> tuple[str, str, str]:
        """q (B, H, S, D), k and v (B, Hkv, S, D) of the new positions, q and k rotated."""
        d = self.d
        heads = []
        for proj, shape in (("q_proj", self.q_shape), ("k_proj", self.kv_shape), ("v_proj", self.kv_shape)):
            y = _linear(w, weights, a, f"{pre}.self_attn.{proj}", f"{sa}/{proj}", d.qkv_bias)
            heads.append(w.op("Transpose", [w.op("Reshape", [y, shape], sa)], sa, perm=[0, 2, 1, 3]))
        q, k, v = heads
        return _rotate(w, q, self.cos, self.sin, f"{sa}/rope_q"), _rotate(w, k, self.cos, self.sin, f"{sa}/rope_k"), v

    def __call__(self, w: GraphWriter, weights, a: str, i: int, pre: str, sa: str) -> tuple[str, str, str]:
        """Normalised hidden states (B, S, D) of layer i -> attention output (B, S, H*hd), present key, value."""
        d = self.d
        groups = d.num_heads // d.num_kv_heads
        q, k, v = self._heads(w, weights, a, pre, sa)
        k = w.op("Concat", [self.past[2 * i], k], sa, axis=2)  # (B, Hkv, P+S, D): the present
        v = w.op("Concat", [self.past[2 * i + 1], v], sa, axis=2)
        present = (k, v)
        if groups > 1:  # repeat_interleave over heads: (B, Hkv, 1, T, D) -> (B, Hkv, g, T, D) -> (B, H, T, D)
            rep = w.op("Concat", [w.op("Shape", [k], sa, start=0, end=2),
                                  w.const(f"{sa}/groups", np.array([groups], np.int64)),
                                  w.op("Shape", [k], sa, start=2)], sa, axis=0)
            k, v = (w.op("Reshape", [w.op("Expand", [w.op("Unsqueeze", [t, self.expand_axis], sa), rep], sa),
                                     self.rep_shape], sa) for t in (k, v))
        scores = w.op("Div", [w.op("MatMul", [q, w.op("Transpose", [k], sa, perm=[0, 1, 3, 2])], sa), self.scale], sa)
        scores = w.op("Add", [scores, self.mask], sa)
        if w.elem != TensorProto.FLOAT:
            scores = w.op("Cast", [scores], sa, to=TensorProto.FLOAT)
        probs = w.op("Softmax", [scores], sa, axis=-1)
        if w.elem != TensorProto.FLOAT:
            probs = w.op("Cast", [probs], sa, to=w.elem)
        o = w.op("Reshape", [w.op("Transpose", [w.op("MatMul", [probs, v], sa)], sa, perm=[0, 2, 1, 3]),
                             self.out_shape], sa)
        return o, *present


class StaticAttention:
    """onnxruntime's GroupQueryAttention over the static cache's shared buffers (onnxruntime-genai's form):
    `seqlens_k` = positions filled - 1 and `total_sequence_length` from the attention mask (ones, batch 1), RoPE by
    the kernel from cos/sin tables of the export's max context, q/k/v from one packed projection."""
    FUSED_NORMS = True  # an onnxruntime graph already: its fused residual + RMSNorm kernel too
    OPSET = 17

    def __init__(self, w: GraphWriter, d, contract: StageContract):
        self.d, self.past, self.present = d, contract.cache.past_names(), contract.cache.present_names()
        length = contract.cache.max_length
        filled = w.op("ReduceSum", ["attention_mask", "axis1"], "/gqa", keepdims=0)  # (B,)
        self.seqlens_k = w.op("Cast", [w.op("Sub", [filled, w.const("one_i64", np.array(1, np.int64))], "/gqa")],
                              "/gqa", to=TensorProto.INT32)
        total = w.op("Gather", [w.op("Shape", ["attention_mask"], "/gqa"), w.const("one_s", np.array(1, np.int64))],
                     "/gqa", axis=0)
        self.total = w.op("Cast", [total], "/gqa", to=TensorProto.INT32)
        # the angles as torch computes them (tgedge.model.decoder.Decoder.rope): fp32, then the compute dtype
        angles = torch.outer(torch.arange(length, dtype=torch.int64).float(), rope_inv_freq(d))  # (M, hd/2)
        self.cos = _tensor(w, "rope/cos_cache", angles.cos())
        self.sin = _tensor(w, "rope/sin_cache", angles.sin())

    @staticmethod
    def constants(w: GraphWriter, d) -> None:
        pass

    def __call__(self, w: GraphWriter, weights, a: str, i: int, pre: str, sa: str) -> tuple[str, str, str]:
        d = self.d
        qkv = _packed_linear(w, weights, a, [f"{pre}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")],
                             f"{pre}.self_attn.qkv_proj", f"{sa}/qkv_proj", d.qkv_bias)  # (B, S, (H + 2 Hkv) hd)
        # the presents are the graph's outputs themselves: an Identity in between would give the kernel a buffer of
        # its own to fill (a copy of the whole cache per step) instead of the one bound as the past
        o, _, _ = w.op("GroupQueryAttention", [qkv, "", "", self.past[2 * i], self.past[2 * i + 1], self.seqlens_k,
                                               self.total, self.cos, self.sin], sa, outputs=3,
                       names=[None, *self.present[2 * i:2 * i + 2]], domain="com.microsoft", num_heads=d.num_heads,
                       kv_num_heads=d.num_kv_heads, do_rotary=1, rotary_interleaved=0, scale=1.0 / math.sqrt(d.head_dim))
        return o, self.present[2 * i], self.present[2 * i + 1]


class OnnxStaticAttention(GrowingAttention):
    """The static cache in standard ONNX ops (opset 24): RoPE and the mask as `GrowingAttention` makes them, with each
    row's positions taken from its attention mask's sum (the filled slots, as GroupQueryAttention's `seqlens_k`), so
    that one call decodes rows of different lengths (a batched cache's slots; a row's mask is ones, then zeros to the
    longest row's length); the step's keys and values written into the buffer by `TensorScatter` at each row's first
    new position, whose output is the present itself (TensorRT's KVCacheUpdate layer needs that: it writes the buffer
    bound as both); `Attention` over the positions the longest row has filled (a Slice of the written buffer), each
    row's padding masked out, grouped-query heads as they are."""
    OPSET = 24  # TensorScatter, Attention

    def __init__(self, w: GraphWriter, d, contract: StageContract):
        self.present = contract.cache.present_names()
        seq = w.op("Gather", [w.op("Shape", ["inputs_embeds"], "/mask"), "one_i"], "/mask", axis=0)
        total = w.op("Gather", [w.op("Shape", ["attention_mask"], "/mask"), "one_i"], "/mask", axis=0)
        filled = w.op("ReduceSum", ["attention_mask", "axis1"], "/mask", keepdims=0)  # (B,): after this step
        # (B,) each row's P, the positions it had cached: the buffers are the past inputs, whatever is filled
        self.write_index = w.op("Sub", [filled, seq], "/mask")
        steps = w.op("Range", ["zero_i", seq, "one_i"], "/mask")  # (S,)
        rows = w.op("Add", [w.op("Unsqueeze", [self.write_index, "minus_one"], "/mask"), steps], "/mask")  # (B, S)
        self.positions = self.write_index, total, rows
        self.first = w.const("first_axis", np.array([0], np.int64))  # [0]: Slice's start
        self.total = w.op("Unsqueeze", [total, self.first], "/mask")  # (1,): Slice's end
        super().__init__(w, d, contract)  # RoPE and the mask, from the positions above

    def _indices(self, w: GraphWriter) -> tuple[str, str, str]:
        return self.positions

    def _position_ids(self, w: GraphWriter) -> str:
        return self.positions[2]  # (B, S)

    def _causal(self, w: GraphWriter, k_idx: str, q_idx: str) -> str:
        """Key positions (T,) against each row's new positions (B, S): (B, 1, S, T)."""
        return w.op("LessOrEqual", [k_idx, w.op("Unsqueeze", [q_idx, w.const("axes13", np.array([1, 3], np.int64))],
                                                "/mask")], "/mask")

    def __call__(self, w: GraphWriter, weights, a: str, i: int, pre: str, sa: str) -> tuple[str, str, str]:
        d = self.d
        q, k, v = self._heads(w, weights, a, pre, sa)
        present, filled = [], []
        for j, new in enumerate((k, v)):
            name = self.present[2 * i + j]
            present.append(w.op("TensorScatter", [self.past[2 * i + j], new, self.write_index], sa, names=[name],
                                axis=2, mode="linear"))  # (B, Hkv, M, D), written in place at P .. P+S-1
            filled.append(w.op("Slice", [name, self.first, self.total, self.expand_axis], sa))  # (B, Hkv, P+S, D)
        # no softmax_precision: TensorRT's parser refuses it (its fused kernels keep the softmax in fp32 themselves)
        o = w.op("Attention", [q, *filled, self.mask], sa, scale=1.0 / math.sqrt(d.head_dim))  # (B, H, S, D)
        o = w.op("Reshape", [w.op("Transpose", [o], sa, perm=[0, 2, 1, 3]), self.out_shape], sa)
        return o, *present


ATTENTION = {"growing": GrowingAttention, "static": StaticAttention,
             "static-onnx": OnnxStaticAttention}  # by the contract's KV cache mode


def static_problem(d) -> str | None:
    """Why GroupQueryAttention's CPU and CUDA kernels cannot run this decoder (they need a head size of 16k), or
    None."""
    if d.head_dim % 16:
        return (f"onnxruntime's GroupQueryAttention (with its RoPE) needs a head size that is a multiple of 16; this "
                f"decoder's is {d.head_dim}")
    return None


def check_static(d) -> None:
    problem = static_problem(d)
    if problem:
        raise TgedgeError(f"--cache static: {problem}: export with --cache static-onnx or --cache growing")


def cache_for_target(target: str, d, say=lambda s: None) -> str:
    """The KV cache `tgedge export --target` writes (tgedge.contract.TARGETS): onnxruntime's is static, or
    static-onnx (any head size, the same runtime and batching) where GroupQueryAttention cannot take the decoder."""
    from tgedge.contract import TARGETS

    mode = TARGETS[target]
    problem = static_problem(d) if mode == "static" else None
    if problem:
        say(f"--target {target}: {problem}: the static-onnx cache instead (standard ops, the same decode)")
        return "static-onnx"
    return mode


def build_decoder(cfg, contract: StageContract, weights, directory: Path, file: str, dtype: str,
                  external: bool, embed_table: TensorProto | None,
                  weight_only: WeightOnly | None = None) -> tuple[onnx.ModelProto, WeightStore]:
    """The decoder graph (tgedge names: `language_model.*`, `lm_head.*`) with the attention of the contract's cache
    mode; `embed_table` is the embed graph's table initializer when the embeddings are tied (the LM head reads it)."""
    d = cfg.decoder
    store = WeightStore(directory, f"{file}.data" if external else None)
    cache = contract.cache
    variant = ATTENTION[cache.mode]
    w = GraphWriter(store, dtype, weight_only, variant.OPSET)
    stage = contract.stages["decoder"]
    w.const("two_f32", np.array(2.0, np.float32))
    variant.constants(w, d)
    w.const("minus_one", np.array([-1], np.int64))
    w.const("big", np.array([np.iinfo(np.int64).max], np.int64))
    w.const("axis1", np.array([1], np.int64))
    try:
        residual_x = w.cast("inputs_embeds", w.elem if w.elem != TensorProto.FLOAT else None, "/embeds")
        attention = variant(w, d, contract)
        residual = Residual(w, weights, residual_x, d.rms_norm_eps, fused=variant.FUSED_NORMS)
        presents = []
        for i in range(d.num_layers):
            pre, s = f"language_model.layers.{i}", f"/layers.{i}"
            a = residual.norm(f"{pre}.input_layernorm.weight", f"{s}/input_layernorm")
            sa = f"{s}/self_attn"
            o, k, v = attention(w, weights, a, i, pre, sa)
            presents += [k, v]
            residual.add(_linear(w, weights, o, f"{pre}.self_attn.o_proj", f"{sa}/o_proj", d.o_bias), s)
            m = residual.norm(f"{pre}.post_attention_layernorm.weight", f"{s}/post_attention_layernorm")
            ms = f"{s}/mlp"
            gate = _linear(w, weights, m, f"{pre}.mlp.gate_proj", f"{ms}/gate_proj", False)
            up = _linear(w, weights, m, f"{pre}.mlp.up_proj", f"{ms}/up_proj", False)
            act = w.op("Mul", [gate, w.op("Sigmoid", [gate], ms)], ms)  # SiLU
            residual.add(_linear(w, weights, w.op("Mul", [act, up], ms), f"{pre}.mlp.down_proj", f"{ms}/down_proj",
                                 False), s)
        x = residual.norm("language_model.norm.weight", "/norm", last=True)
        # the last position only, (B, 1, D) -> (B, D) for the LM head's Gemm -> (B, 1, V)
        last = w.op("Slice", [x, "minus_one", "big", "axis1"], "/lm_head")
        flat = w.op("Reshape", [last, w.const("flat_shape", np.array([-1, d.hidden_size], np.int64))], "/lm_head")
        if w.weight_only and w.weight_only.lm_head:  # decode reads the head's table every step: quantised too
            source = "language_model.embed_tokens.weight" if d.tie_word_embeddings else "lm_head.weight"
            scores = _nbits(w, weights.raw(source), flat, "lm_head.weight", "/lm_head")  # (V, D) is (N, K)
        else:
            if d.tie_word_embeddings and embed_table is not None:
                table = store.share("lm_head.tied_embed_tokens", embed_table)
            elif d.tie_word_embeddings:  # no embed graph beside it (export's truncated check): its own copy
                table = _weight(w, weights, "language_model.embed_tokens.weight")
            else:
                table = _weight(w, weights, "lm_head.weight")  # (V, D): Gemm's transB reads it as stored
            scores = w.op("Gemm", [flat, table], "/lm_head", transB=1)
        logits = w.op("Unsqueeze", [scores, "axis1"], "/lm_head")
        if w.elem != TensorProto.FLOAT:
            logits = w.op("Cast", [logits], "/lm_head", to=TensorProto.FLOAT)
        w.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/lm_head/logits"))
        for name, value in zip(cache.present_names(), presents):
            if value != name:
                w.nodes.append(helper.make_node("Identity", [value], [name], name=f"/present/{name}"))
    finally:
        store.close()
    graph = helper.make_graph(w.nodes, "decoder", [_value_info(t) for t in stage.inputs],
                              [_value_info(t) for t in stage.outputs], store.initializers + w.consts)
    return _model(graph, opset=w.opset), store


def build_embed(cfg, contract: StageContract, weights, directory: Path, file: str, dtype: str,
                external: bool) -> tuple[onnx.ModelProto, WeightStore]:
    store = WeightStore(directory, f"{file}.data" if external else None)
    w = GraphWriter(store, dtype)
    try:
        table = _weight(w, weights, "language_model.embed_tokens.weight")
    finally:
        store.close()
    out = w.op("Gather", [table, "input_ids"], "/embed_tokens", axis=0)
    w.nodes.append(helper.make_node("Cast", [out], ["inputs_embeds"], name="/embed_tokens/Cast",
                                    to=TensorProto.FLOAT) if w.elem != TensorProto.FLOAT else
                   helper.make_node("Identity", [out], ["inputs_embeds"], name="/embed_tokens/Identity"))
    stage = contract.stages["embed"]
    graph = helper.make_graph(w.nodes, "embed", [_value_info(t) for t in stage.inputs],
                              [_value_info(t) for t in stage.outputs], store.initializers + w.consts)
    return _model(graph), store


def _value_info(t) -> onnx.ValueInfoProto:
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
            "int64": TensorProto.INT64}[t.dtype]
    return helper.make_tensor_value_info(t.name, elem, list(t.shape))


def _model(graph, opset: int = 17) -> onnx.ModelProto:
    """The model around `graph`, importing onnxruntime's domain where a node of the graph is in it."""
    ms_domain = any(n.domain == "com.microsoft" for n in graph.node)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms_domain else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tgedge")
    # opset 17: IR 8, what onnxruntime >= 1.14 and TensorRT 8.6+ read; a newer opset: the IR onnx pairs it with
    model.ir_version = 8 if opset <= 17 else helper.find_min_ir_version_for(opsets[:1])
    return model


def save(model: onnx.ModelProto, path: Path) -> None:
    """Write the graph's structure; its weights are already in place (inline or in the data file)."""
    if model.ByteSize() > (2 << 30) - (64 << 20):
        raise TgedgeError(f"{path}: graph over protobuf's 2 GiB limit with inline weights: export with external data")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    os.chmod(path, 0o644)
