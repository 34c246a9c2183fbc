"""SmoothQuant for the Q/DQ graphs: each activation channel's scale moved into the weights before int8.

Per-tensor int8 activations lose the many small channels when a few are tens of times larger, and trained LLMs and
ViTs have such outlier channels in their normalised activations (LLM.int8(), SmoothQuant). For a MatMul input X whose
channels can be rescaled exactly upstream, SmoothQuant (Xiao et al., 2023) takes per input channel j

    s_j = max|X_j| ** alpha / max_k |W_jk| ** (1 - alpha)

and computes (X / s) (diag(s) W): the same product, X's channels evened out, W's rows spread (W is quantised per
output column, so its rows may differ). The 1/s is folded into what makes X, so the graph keeps its ops and TensorRT
parses it as before; only initializer values change:

- a norm's gain: RMSNorm's `Mul` by a gain vector, or the gain of onnxruntime's fused RMSNorms
  (`SkipSimplifiedLayerNormalization`: the static-cache decoder's); `LayerNormalization`'s scale and bias;
- a gated MLP's up projection: X = act(gate) * up, so up's output columns (and bias) take the 1/s.

Every MatMul reading X takes the same s (q, k and v share their norm): max |W_jk| is over all of them. Inputs that
cannot be folded (attention's output into o_proj, the LM head behind a Slice) stay as they are. `max|X_j|` comes
from the calibration pass (`tgedge.calibration.ranges` measures it per channel beside the per-tensor ranges), and the
smoothed input's per-tensor range is then exactly max_j max|X_j| / s_j: no second pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

DEFAULT_ALPHA = 0.5  # SmoothQuant's default; measured on the realistic presets (docs/QUANTIZATION.md)
AUTO = "auto"  # --smooth auto (the default): DEFAULT_ALPHA on the inputs with outlier channels, the others left alone
SEARCH = "search"  # --smooth search: every foldable input, its alpha (or none) searched by `search_scales`
OUTLIER_RATIO = 8.0  # an input has outlier channels when its largest channel max |x| is this many times the median
# channel's: `tgedge checkpoint stats` uses the same 8x; the demo's inputs measure ~2, the realistic presets' 30-60
MIN_SCALE = 1e-5
# onnxruntime's fused RMSNorms (the static-cache decoder's residual Add + RMSNorm is one SkipSimplifiedLayerNormalization,
# export/decoder_graph.py) -> the input that is their gain: its output 0 is x / rms(x) * gain, like the Mul by a gain
FUSED_RMS_NORMS = {"SkipSimplifiedLayerNormalization": 2, "SimplifiedLayerNormalization": 1}


@dataclass
class Group:
    """One smoothable activation: the MatMuls that read it (with their weights) and what makes it."""
    tensor: str
    matmuls: list[tuple[str, str]]  # (node name, weight initializer (C_in, C_out))
    kind: str  # "gain" | "layernorm" | "gated"
    fold: list[str]  # initializers that take 1/s: a gain (and a LayerNorm bias) per channel; gated: up's weight, bias
    channels: int


def _uses(proto: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def groups(proto: onnx.ModelProto) -> list[Group]:
    """The activations of `proto` that SmoothQuant can fold (names and shapes only: weights may stay on disk)."""
    inits = {t.name: t for t in proto.graph.initializer}
    uses = _uses(proto)
    made_by = {o: n for n in proto.graph.node for o in n.output}
    outputs = {o.name for o in proto.graph.output}

    def only_use(name: str, node: onnx.NodeProto) -> bool:
        return name not in outputs and [u.name for u in uses.get(name, [])] == [node.name]

    def vector(name: str, size: int) -> bool:
        t = inits.get(name)
        return t is not None and list(t.dims) == [size]

    found = []
    for tensor, readers in uses.items():
        if tensor in inits or tensor in outputs or not readers:
            continue
        if not all(r.op_type == "MatMul" and r.input[0] == tensor and r.input[1] in inits
                   and len(inits[r.input[1]].dims) == 2 for r in readers):
            continue
        weights = [inits[r.input[1]] for r in readers]
        c = int(weights[0].dims[0])
        if any(int(w.dims[0]) != c for w in weights) or any(len(uses[w.name]) != 1 for w in weights):
            continue  # a weight read elsewhere (tied) would change there too
        maker = made_by.get(tensor)
        if maker is None:
            continue
        fold, kind = None, None
        if maker.op_type == "Mul":
            gain = [i for i in maker.input if vector(i, c) and only_use(i, maker)]
            if len(gain) == 1:
                fold, kind = gain, "gain"
            else:
                fold, kind = _gated_fold(maker, c, inits, made_by, only_use), "gated"
        elif maker.op_type in FUSED_RMS_NORMS and maker.output[0] == tensor:
            gain = maker.input[FUSED_RMS_NORMS[maker.op_type]] if len(maker.input) > FUSED_RMS_NORMS[maker.op_type] \
                else ""
            if vector(gain, c) and only_use(gain, maker):
                fold, kind = [gain], "gain"
        elif maker.op_type == "LayerNormalization" and len(maker.input) >= 2 and vector(maker.input[1], c) \
                and only_use(maker.input[1], maker):
            bias = [maker.input[2]] if len(maker.input) > 2 and maker.input[2] else []
            if all(vector(b, c) and only_use(b, maker) for b in bias):
                fold, kind = [maker.input[1], *bias], "layernorm"
        if fold:
            found.append(Group(tensor, [(r.name, r.input[1]) for r in readers], kind, fold, c))
    return found


def _gated_fold(mul: onnx.NodeProto, c: int, inits, made_by, only_use) -> list[str] | None:
    """X = act(gate) * up with up = MatMul(h, W_up) (+ bias) read by this Mul alone (so the other factor cannot
    depend on it): W_up's output columns and its bias take the 1/s."""
    for up in mul.input:
        if not only_use(up, mul):
            continue
        node, bias = made_by.get(up), []
        if node is not None and node.op_type == "Add":
            b = [x for x in node.input if x in inits]
            x = [x for x in node.input if x not in inits]
            if len(b) != 1 or len(x) != 1 or list(inits[b[0]].dims) != [c] or not only_use(b[0], node) \
                    or not only_use(x[0], node):
                continue
            bias, node = b, made_by.get(x[0])
        if node is None or node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if len(w.dims) != 2 or int(w.dims[1]) != c or not only_use(node.input[1], node):
            continue
        return [node.input[1], *bias]
    return None


def scales(absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel s of one input (weights: the (C_in, C_out) of each MatMul reading it)."""
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    a = np.maximum(np.asarray(absmax, np.float64), MIN_SCALE)
    s = a ** alpha / np.maximum(w_max.astype(np.float64), MIN_SCALE) ** (1 - alpha)
    return np.clip(s, MIN_SCALE, None)


SEARCH_GRID = tuple(i / 10 for i in range(11))  # SmoothQuant's alpha, searched per input by `search_scales`


def _int8_columns(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 round-to-nearest of W (C_in, C_out), one scale per output column (what the Q/DQ graphs
    store), dequantised."""
    scale = np.abs(w).max(axis=0, keepdims=True) / 127
    scale[scale == 0] = 1.0
    return np.clip(np.round(w / scale), -127, 127) * scale


def w8a8_error(absmax: np.ndarray, mean_sq: np.ndarray, weights: list[np.ndarray], s: np.ndarray) -> float:
    """Expected squared output error per row of int8 X/s (one range for the tensor) times int8 diag(s) W (one scale
    per output column), channels and the two roundings taken as uncorrelated:
    step^2 / 12 * ||diag(s) W||^2 (the activation's rounding, step = max_j max|X_j| / s_j / 127) plus
    sum_j E[X_j^2] / s_j^2 ||Q(s_j W_j) - s_j W_j||^2 (the weights')."""
    step = float(np.max(absmax / s)) / 127
    err = 0.0
    for w in weights:
        ws = w.astype(np.float64) * s[:, None]
        err += step ** 2 / 12 * float((ws ** 2).sum())
        err += float((mean_sq / s ** 2) @ ((_int8_columns(ws) - ws) ** 2).sum(axis=1))
    return err


def search_scales(absmax: np.ndarray, mean_sq: np.ndarray, weights: list[np.ndarray],
                  grid: tuple[float, ...] = SEARCH_GRID) -> tuple[np.ndarray | None, float | None]:
    """SmoothQuant with its alpha searched per input (the paper picks one alpha per model on held-out data; here each
    input takes the alpha of `grid`, or no smoothing, whose `w8a8_error` is least). Returns (s, alpha), or
    (None, None) where leaving the input alone is best."""
    a = np.maximum(np.asarray(absmax, np.float64), MIN_SCALE)
    m2 = np.maximum(np.asarray(mean_sq, np.float64), 1e-12)
    best = (w8a8_error(a, m2, weights, np.ones_like(a)), None, None)
    for alpha in grid:
        s = scales(a, weights, alpha)
        err = w8a8_error(a, m2, weights, s)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def _rtn(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Round-to-nearest symmetric block quantisation of W (C_in, C_out) along C_in, dequantised (MatMulNBits'
    scheme: one scale per `block` input rows of each output column)."""
    c_in = w.shape[0]
    pad = (-c_in) % block
    wp = np.pad(w, ((0, pad), (0, 0))).reshape(-1, block, w.shape[1])
    top = 2 ** (bits - 1)
    scale = np.abs(wp).max(axis=1, keepdims=True) / top
    scale[scale == 0] = 1.0
    q = np.clip(np.round(wp / scale), -top, top - 1) * scale
    return q.reshape(-1, w.shape[1])[:c_in]


AWQ_GRID = tuple(i / 10 for i in range(11))  # AWQ's search over the exponent (llm-awq: 20 points; 11 here)


def awq_scales(mean_sq: np.ndarray, weights: list[np.ndarray], bits: int, block: int,
               grid: tuple[float, ...] = AWQ_GRID) -> tuple[np.ndarray, float]:
    """AWQ-style scales (Lin et al., 2024): s = rms(X)^a, normalised, with the exponent a picked from `grid` to minimise
    the expected output error of round-to-nearest weights, E||X/s (Q(sW) - sW)||^2 ~ sum_j E[X_j^2] / s_j^2
    ||Q(sW)_j - (sW)_j||^2 (channels taken as uncorrelated: what per-channel statistics can tell; llm-awq measures
    the error on stored activations instead). Returns s and the exponent."""
    m2 = np.maximum(np.asarray(mean_sq, np.float64), 1e-12)
    rms = np.sqrt(m2)
    best = None
    for a in grid:
        s = rms ** a
        s = s / np.sqrt(s.max() * s.min())
        err = 0.0
        for w in weights:
            ws = w.astype(np.float64) * s[:, None]
            err += float((m2 / s ** 2) @ ((_rtn(ws, bits, block) - ws) ** 2).sum(axis=1))
        if best is None or err < best[0]:
            best = (err, s, a)
    return best[1], best[2]


def fold(proto: onnx.ModelProto, pick) -> dict[str, np.ndarray]:
    """Fold per-channel scales into `proto`'s initializers (loaded: weights in memory), in place: for each group,
    `pick(group, weights)` gives s (or None to leave it), each reading MatMul's rows take s, what makes the input
    takes 1/s. Returns tensor -> s."""
    inits = {t.name: t for t in proto.graph.initializer}

    def get(name):
        return numpy_helper.to_array(inits[name])

    def put(name, value):
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, get(name).dtype), name))

    done = {}
    for g in groups(proto):
        weights = [get(w) for _, w in g.matmuls]
        s = pick(g, weights)
        if s is None:
            continue
        for (_, name), w in zip(g.matmuls, weights):
            put(name, w * s[:, None])
        if g.kind == "gated":
            put(g.fold[0], get(g.fold[0]) / s[None, :])
            for b in g.fold[1:]:
                put(b, get(b) / s)
        else:
            for name in g.fold:
                put(name, get(name) / s)
        done[g.tensor] = s
    return done


def outlier_ratio(absmax: np.ndarray) -> float:
    """Largest channel max |x| over the median channel's (1 for even channels)."""
    a = np.asarray(absmax, np.float64)
    return float(a.max() / max(float(np.median(a)), MIN_SCALE))


def with_outliers(absmax: dict[str, np.ndarray], ratio: float = OUTLIER_RATIO) -> dict[str, np.ndarray]:
    """The inputs of `absmax` whose channels are uneven enough for SmoothQuant to matter (`--smooth auto`)."""
    return {t: a for t, a in absmax.items() if outlier_ratio(a) >= ratio}


def _fold_chosen(proto: onnx.ModelProto, choose) -> dict[str, tuple[np.ndarray, float]]:
    """`fold` with scales that come with the setting that chose them: `choose(group, weights)` gives (s, setting), or
    (None, _) to leave the input. Returns tensor -> (s, setting) for the inputs folded."""
    chosen = {}

    def pick(g, weights):
        s, setting = choose(g, weights)
        if s is not None:
            chosen[g.tensor] = setting
        return s

    return {t: (s, chosen[t]) for t, s in fold(proto, pick).items()}


def smooth(proto: onnx.ModelProto, absmax: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """SmoothQuant's scales folded into `proto`, in place, for every input whose per-channel max |X| is in `absmax`."""
    return fold(proto, lambda g, weights: scales(absmax[g.tensor], weights, alpha) if g.tensor in absmax else None)


def searched(proto: onnx.ModelProto, absmax: dict[str, np.ndarray],
             mean_sq: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, float]]:
    """SmoothQuant folded into `proto`, in place, with each input's alpha searched (`search_scales`) for every input
    in `absmax` (per-channel max |X|) and `mean_sq` (per-channel mean of X^2). Returns tensor -> (s, alpha) for the
    inputs smoothed (an input best left alone is not)."""
    return _fold_chosen(proto, lambda g, weights: search_scales(absmax[g.tensor], mean_sq[g.tensor], weights)
                        if g.tensor in absmax and g.tensor in mean_sq else (None, None))


def activation_aware(proto: onnx.ModelProto, mean_sq: dict[str, np.ndarray], bits: int,
                     block: int) -> dict[str, tuple[np.ndarray, float]]:
    """AWQ-style scales folded into `proto`, in place, before its weights are quantised to `bits` in `block`s.
    Returns tensor -> (s, chosen exponent)."""
    return _fold_chosen(proto, lambda g, weights: awq_scales(mean_sq[g.tensor], weights, bits, block)
                        if g.tensor in mean_sq else (None, None))
