"""How `tgedge checkpoint random` draws its values: the `flat` and `realistic` inits and the planted outlier channels.

Both are random (a preset answers noise either way); they differ in how much they stress deployment.

- `flat`: every weight N(0, 0.02), norm weights 1 + N(0, 0.02) (the configs' `initializer_range`). Activations stay
  O(1) and next-token distributions are near-flat, so fp32 error is ~1e-6 and int8/int4 noise hides in near-ties.
- `realistic`: variance-preserving weights, W ~ N(0, g^2 / fan_in), with gains chosen for what trained models show
  (docs/SCALE.md states each target, its source, and what this produces, measured): q/k gain 1 (attention scores of
  std ~1; gain 2, scores of std ~4, made a 24-layer decoder chaotic: 0.1 % weight noise flipped a quarter of its
  argmaxes, where trained checkpoints survive bf16 rounding and 8-bit weights unchanged); in the vision and text
  towers the residual writers (out_proj/fc2) of sublayer k at gain sqrt(2k + 1) (the residual stream's rms grows
  linearly with depth); in the decoder o_proj and down_proj writing 0.3x and 1x a token embedding's std (the
  residual still grows, as sqrt(depth)), and random signs on the final norm's gains; an output vocabulary whose logits have std ~3 with a log-normal spread of row norms (a heavy right tail: sharp
  next-token distributions). The decoder's rules are what keep its greedy paths varied and stable at 24 layers
  (docs/SCALE.md "Greedy paths": with the towers' rules, near-uniform random attention averages every position into
  the same state, and a tied head copies the current token, so the path was one token repeated).
- outliers (`--outliers N`, on by default with `realistic`): N channels of the decoder's and the vision tower's
  pre-attention and pre-MLP norm weights (and LayerNorm biases) OUTLIER_GAIN times the rest, and the matching input
  columns of the Linear layers those norms feed scaled down by as much, so the function is the same model's (up to
  bf16 rounding) while the normalised activations carry the channels quantisation must handle (LLM.int8(),
  SmoothQuant). The same channels in every layer of a tower, as in trained models.

Each rule maps a tensor name to its values' scale only: the drawing itself stays in presets.tensor_bytes, streamed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

from tgedge.errors import TgedgeError

INITS = ("realistic", "flat")
DEFAULT_OUTLIERS = 4  # channels per tower; LLM.int8() finds a handful of outlier dimensions per model
OUTLIER_GAIN = 32.0  # "tens of times the rest": the measurement used 32
QK_GAIN = 1.0  # scores q.k / sqrt(d) of std ~1: the largest gain (of 1, 1.25, 1.5, 2) with margin that keeps
# 8-bit round-to-nearest weights lossless at 0.5 B, as they are on trained models (docs/SCALE.md, sensitivity)
LOGIT_STD = 3.0  # last-position logit std of trained LMs is ~2-4 (docs/SCALE.md)
ROW_SPREAD = 0.3  # log-normal sigma of vocabulary row norms: median top-1 probability ~0.5 at logit std 3
ZERO_LAYER_GAIN = 4.0  # TG-FOM's term, a few percent of the (grown) vision features
# The decoder's residual writers, in units of a token embedding's std (LOGIT_STD / sqrt(hidden), tied):
ATTN_WRITER_GAIN = 0.3  # o_proj: random attention is near-uniform, so what it writes is the same at every position;
# at the towers' sqrt(2k + 1) it swamps the token's own state (rank collapse: Dong et al., 2021)
MLP_WRITER_GAIN = 1.0  # down_proj: each MLP writes as much as the token's embedding holds; larger made varied paths
# chaotic (docs/SCALE.md "Greedy paths")


# -- the realistic scale of each tensor: one table, first match wins ---------------------------------------------
def _fan_in(shape: tuple) -> int:
    return math.prod(shape[1:])


def _vocab(name, shape):  # the tied embedding or the LM head: logits = h_normed . row
    return LOGIT_STD / math.sqrt(shape[1])


def _decoder_writer(name, shape):  # o_proj / down_proj (out_features = hidden): in units of the embedding's std
    gain = ATTN_WRITER_GAIN if "self_attn" in name else MLP_WRITER_GAIN
    return gain * LOGIT_STD / math.sqrt(shape[0]) / math.sqrt(_fan_in(shape))


def _qk(name, shape):
    return QK_GAIN / math.sqrt(_fan_in(shape))


def _residual_writer(name, shape):
    """Sublayer k (2 per layer) writes at gain sqrt(2k + 1): the residual's variance after K sublayers is K^2."""
    m = re.search(r"layers\.(\d+)\.(self_attn|mlp)", name)
    k = 2 * int(m.group(1)) + (m.group(2) == "mlp")
    return math.sqrt(2 * k + 1) / math.sqrt(_fan_in(shape))


def _zero_layer(name, shape):
    return ZERO_LAYER_GAIN / math.sqrt(_fan_in(shape))


def _linear(name, shape):
    return 1.0 / math.sqrt(_fan_in(shape))


SCALES: list[tuple[str, Callable]] = [
    (r"^(model\.embed_tokens|lm_head)\.weight$", _vocab),
    (r"^model\.mm_cross_attn\.zero_layer\.weight$", _zero_layer),
    (r"(self_attn\.(q|k)_proj|self\.(query|key))\.weight$", _qk),
    (r"^model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight$", _decoder_writer),
    (r"^(vision|text)_model\.encoder\.layers\.\d+\.(self_attn\.out_proj|mlp\.fc2)\.weight$", _residual_writer),
    (r"(position_embeddings?|word_embeddings|token_embedding)\.weight$", None),  # embeddings keep the flat std
    (r"\.weight$", _linear),  # every other matrix (and the patch convolution): variance-preserving
]
ROW_SPREAD_NAMES = r"^(model\.embed_tokens|lm_head)\.weight$"
FINAL_NORM = r"^model\.norm\.weight$"


def final_norm(spec):
    """The decoder's final norm under `realistic`: random signs. A tied head's logit for the current token is
    h . e_token, and the residual carries e_token: with gains of one sign that copy wins and greedy repeats the token;
    random signs cancel it (sum_j s_j e_j^2 ~ 0) and leave the logits' std."""
    return dataclasses.replace(spec, signs=True)


def realistic_scale(spec):
    """(std, row_spread) of a tensor under `realistic`; norms, biases, embeddings and constants keep theirs."""
    if spec.init != "normal" or len(spec.shape) < 2:
        return spec.std, 0.0
    for pattern, rule in SCALES:
        if re.search(pattern, spec.name):
            std = spec.std if rule is None else rule(spec.name, spec.shape)
            return std, ROW_SPREAD if re.search(ROW_SPREAD_NAMES, spec.name) else 0.0
    return spec.std, 0.0


# -- outlier channels: where they go, per tower ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OutlierSite:
    """A tower's outliers: its norms' channels scaled up, the Linear columns those norms feed scaled down."""
    tower: str
    width: Callable  # ModelConfig -> hidden size
    gains: str  # norm weights (and LayerNorm biases) that carry the channels
    columns: str  # the weights that read those norms' outputs


OUTLIER_SITES = [
    OutlierSite("decoder", lambda cfg: cfg.decoder.hidden_size,
                r"^model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight$",
                r"^model\.layers\.\d+\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.weight$"),
    OutlierSite("vision", lambda cfg: cfg.vision.hidden_size,
                r"^vision_model\.encoder\.layers\.\d+\.layer_norm(1|2)\.(weight|bias)$",
                r"^vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v)_proj|mlp\.fc1)\.weight$"),
]


def outlier_channels(rng_for: Callable[[str], np.random.Generator], cfg, n: int) -> dict[str, tuple[int, ...]]:
    """tower -> its n outlier channels, drawn from the preset's seed (the same for a seed, whatever the order)."""
    out = {}
    for site in OUTLIER_SITES:
        width = site.width(cfg)
        if n > width // 4:
            raise TgedgeError(f"--outliers | got {n} | expected at most a quarter of the {site.tower}'s {width} "
                              f"channels ({width // 4})")
        out[site.tower] = tuple(sorted(int(c) for c in rng_for(f"outliers/{site.tower}").choice(width, n, False)))
    return out


def apply(specs: list, cfg, init: str, outliers: int, rng_for: Callable[[str], np.random.Generator]) -> list:
    """The plan's specs with the init's scales and the outlier channels set (flat with no outliers: unchanged)."""
    if init not in INITS:
        raise TgedgeError(f"--init | got {init!r} | expected one of {', '.join(INITS)}")
    if not isinstance(outliers, int) or outliers < 0:
        raise TgedgeError(f"--outliers | got {outliers!r} | expected a non-negative channel count or none")
    channels = outlier_channels(rng_for, cfg, outliers) if outliers else {}
    out = []
    for s in specs:
        if init == "realistic":
            std, spread = realistic_scale(s)
            s = dataclasses.replace(s, std=std, row_spread=spread)
            if re.search(FINAL_NORM, s.name):
                s = final_norm(s)
        for site in OUTLIER_SITES if channels else ():
            if re.search(site.gains, s.name):
                s = dataclasses.replace(s, channels=channels[site.tower], channel_scale=OUTLIER_GAIN)
            elif re.search(site.columns, s.name):
                s = dataclasses.replace(s, channels=channels[site.tower], channel_scale=1 / OUTLIER_GAIN)
        out.append(s)
    return out


def planted(specs: list) -> dict[str, list[int]]:
    """tower -> the outlier channels the specs carry (empty without outliers), for the checkpoint's marker."""
    return {site.tower: list(s.channels) for site in OUTLIER_SITES for s in specs
            if s.channels and re.search(site.gains, s.name)}


def default_outliers(init: str) -> int:
    """Outliers come with the realistic init; `flat` keeps today's files unless asked."""
    return DEFAULT_OUTLIERS if init == "realistic" else 0
