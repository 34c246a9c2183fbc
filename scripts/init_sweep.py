"""How sensitive a random decoder init is to weight noise, per gain choice: the experiment that set presets_init's
QK_GAIN (docs/SCALE.md, "Sensitivity").

    python scripts/init_sweep.py CHECKPOINT [--clip DIR] [--tokens N]

Loads CHECKPOINT (a `tgedge checkpoint random` output; its vision tower and prompt embeddings stay as written), then
for each variant re-draws the decoder layers' weights in torch with the realistic rules (W ~ N(0, g^2 / fan_in); q/k
gain `qk`; residual writers of sublayer k at gain sqrt(2k + 1), 1 or 0.5; N outlier channels of the norms 32x with
the matching input columns 32x smaller) and reports, over greedy tokens of two questions teacher-forced again: the
median top-1 probability, and the top-1 agreement after Gaussian weight noise of 0.1 % and 1 % of each tensor's
std, after 8-bit per-output-channel rounding, and after 4-bit round-to-nearest in blocks of 32 (int4w's format). A
trained checkpoint keeps its argmaxes under the first three (bf16 storage alone is ~0.2 % relative rounding) and most
of them under the fourth; an init that does not is chaotic.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from tgedge.checkpoint import load_model
from tgedge.generate import forced_logits, generate
from tgedge.model_stats import _default_image, _round8
from tgedge.reference import TorchPipeline

QUESTIONS = ["What is in the picture?", "Describe the image in detail."]
VARIANTS = [("qk 2, writers sqrt(2k+1), 4 outliers", {"qk": 2.0}), ("qk 2, no outliers", {"qk": 2.0, "outliers": 0}),
            ("qk 1.5", {"qk": 1.5}), ("qk 1.25", {"qk": 1.25}), ("qk 1", {"qk": 1.0}),
            ("qk 2, writers 1", {"qk": 2.0, "writer": "one"}), ("qk 2, writers 0.5", {"qk": 2.0, "writer": "half"})]
WRITERS = {"sqrt": lambda k: math.sqrt(2 * k + 1), "one": lambda k: 1.0, "half": lambda k: 0.5}


def writer_gain(writer):
    """A writer rule by name (WRITERS) or a constant gain (a number)."""
    return WRITERS[writer] if writer in WRITERS else (lambda k, g=float(writer): g)


def redraw(lm, width: int, qk: float, writer="sqrt", outliers: int = 4, gain: float = 32.0, seed: int = 0,
           attn_writer=None):
    """The decoder layers re-drawn by the realistic rules; `writer` the residual writers' gain rule (o_proj and
    down_proj), `attn_writer` o_proj's alone where given."""
    g = torch.Generator().manual_seed(seed)
    mlp_gain, attn_gain = writer_gain(writer), writer_gain(writer if attn_writer is None else attn_writer)
    channels = torch.randperm(width, generator=g)[:outliers]
    with torch.no_grad():
        for name, m in lm.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            layer = int(re.search(r"layers\.(\d+)", name).group(1))
            if re.search(r"(q|k)_proj", name):
                s = qk
            elif re.search(r"(o|down)_proj", name):
                s = (mlp_gain if "mlp" in name else attn_gain)(2 * layer + ("mlp" in name))
            else:
                s = 1.0
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * s / math.sqrt(m.weight.shape[1]))
            if outliers and re.search(r"(q|k|v|gate|up)_proj", name):
                m.weight[:, channels] /= gain
        for layer in lm.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(1 + 0.02 * torch.randn(width, generator=g))
                if outliers:
                    norm.weight[channels] *= gain


def round4(w: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Asymmetric 4-bit round-to-nearest in blocks along the input (what int4w's MatMulNBits stores)."""
    o, i = w.shape
    g = w.reshape(o, i // block, block)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo).clamp_min(1e-12) / 15
    zero = torch.round(-lo / step)
    return ((torch.round(g / step + zero).clamp(0, 15) - zero) * step).reshape(o, i)


def agreement(pipe, linears, runs, ref, fn) -> float:
    """Teacher-forced top-1 agreement with `ref` after `fn` on every weight of `linears` (restored after)."""
    saved = [m.weight.data for m in linears]
    torch.manual_seed(1)
    for m in linears:
        m.weight.data = fn(m.weight.data)
    with torch.no_grad():
        out = [forced_logits(pipe, x, t) for x, t in runs]
    for m, w in zip(linears, saved):
        m.weight.data = w
    return float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ref, out)])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--clip", help="CLIP directory (default CHECKPOINT/clip)")
    ap.add_argument("--tokens", type=int, default=20, help="greedy tokens per question (default 20)")
    args = ap.parse_args()
    model, ckpt = load_model(args.checkpoint, args.clip or str(Path(args.checkpoint) / "clip"))
    pipe = TorchPipeline(model, ckpt.preprocessor)
    lm = model.language_model
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    with tempfile.TemporaryDirectory() as tmp:
        image = _default_image(Path(tmp))
        xs = [pipe.embeddings(pipe.pre(image, q)) for q in QUESTIONS]
    perturb = [("noise 0.1 %", lambda w: w + 1e-3 * w.std() * torch.randn_like(w)),
               ("noise 1 %", lambda w: w + 1e-2 * w.std() * torch.randn_like(w)), ("8-bit rounding", _round8),
               ("4-bit, blocks 32", round4)]
    print(f"{'variant':<40}{'top-1 p50':>10}" + "".join(f"{name:>18}" for name, _ in perturb))
    for label, kw in VARIANTS:
        redraw(lm, model.cfg.decoder.hidden_size, **kw)
        options = pipe.options(max_new_tokens=args.tokens, eos_token_ids=[], stop_strings=[])
        runs = [(x, generate(pipe, x, options, pipe.context).tokens) for x in xs]
        with torch.no_grad():
            ref = [forced_logits(pipe, x, t) for x, t in runs]
        p = np.concatenate([np.exp(a - a.max(-1, keepdims=True)) for a in ref])
        row = f"{label:<40}{np.median(p.max(-1) / p.sum(-1)):>10.2f}"
        for _, fn in perturb:
            row += f"{agreement(pipe, linears, runs, ref, fn):>18.3f}"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
