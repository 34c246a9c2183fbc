"""Are a random decoder's greedy paths varied AND stable? The experiment behind docs/SCALE.md "Greedy paths".

    python scripts/path_sweep.py CHECKPOINT [--clip DIR] VARIANT [VARIANT ...]

A VARIANT is comma-separated settings (defaults in brackets): qk [1] q/k gain; aw [sqrt] o_proj's gain (sqrt: sublayer
k at sqrt(2k + 1), or a number); mw [sqrt] down_proj's; out [4] outlier channels; f [1] the tied embedding times f and
the final norm's gains divided by f (the same logits for a given hidden state, a larger token identity in the
residual); neg [0] 1: random signs on the final norm's gains; g [1] the image embeddings times g; p [0] 1: also the
perturbations. E.g. `qk=1,aw=0.3,mw=1,neg=1,p=1`.

For each variant the decoder layers are re-drawn (scripts/init_sweep.py's `redraw`), the vision tower and prompt
embeddings of CHECKPOINT kept, and one line printed: over the first question's 35 text positions, how many distinct
argmaxes and the mean cosine between their final hidden states (1: every position says the same, rank collapse); the
median top-1 probability; the greedy paths of two questions (12 tokens each: distinct tokens, and how many the two
share); with p=1 the teacher-forced top-1 agreement after 1 % Gaussian weight noise, 8-bit per-channel rounding and
4-bit blocks of 32, every decoder Linear. A trained model's paths are varied and keep their argmaxes under the first
two; a random init is a fair test of a quantiser only if it does both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from init_sweep import QUESTIONS, agreement, redraw, round4  # noqa: E402

from tgedge.checkpoint import load_model  # noqa: E402
from tgedge.generate import forced_logits, generate  # noqa: E402
from tgedge.model_stats import _default_image, _round8, path_shape  # noqa: E402
from tgedge.reference import TorchPipeline  # noqa: E402

PERTURB = [("noise 1 %", lambda w: w + 1e-2 * w.std() * torch.randn_like(w)), ("8-bit", _round8),
           ("4-bit", round4)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--clip", help="CLIP directory (default CHECKPOINT/clip)")
    args = ap.parse_args()
    model, ckpt = load_model(args.checkpoint, args.clip or str(Path(args.checkpoint) / "clip"))
    pipe, lm = TorchPipeline(model, ckpt.preprocessor), model.language_model
    width = model.cfg.decoder.hidden_size
    with tempfile.TemporaryDirectory() as tmp:
        inputs = [pipe.pre(_default_image(Path(tmp)), q) for q in QUESTIONS]
    xs0 = [pipe.embeddings(i) for i in inputs]
    texts = [torch.from_numpy(i.input_ids[0] != ckpt.preprocessor.spec.image_token_id) for i in inputs]
    table, norm = lm.embed_tokens.weight.data.clone(), lm.norm.weight.data.clone()
    signs = torch.where(torch.rand(width, generator=torch.Generator().manual_seed(5)) < 0.5, -1.0, 1.0)
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    for spec in args.variants:
        kw = dict(kv.split("=") for kv in spec.split(","))
        f, g = float(kw.get("f", 1)), float(kw.get("g", 1))
        start = time.perf_counter()
        redraw(lm, width, float(kw.get("qk", 1)), kw.get("mw", "sqrt"), int(kw.get("out", 4)),
               attn_writer=kw.get("aw", "sqrt"))
        lm.embed_tokens.weight.data = table * f
        lm.norm.weight.data = norm / f * (signs if kw.get("neg") == "1" else 1.0)
        xs = []
        for x, text in zip(xs0, texts):
            x = x.clone()
            x[0, text] *= f
            x[0, ~text] *= g
            xs.append(x)
        with torch.no_grad():
            lm.clear_cache()
            h = lm(xs[0], torch.arange(xs[0].shape[1]))[0][texts[0]]
            logits = h @ lm.embed_tokens.weight.T
            unit = torch.nn.functional.normalize(h, dim=-1)
            cos = (unit @ unit.T)[~torch.eye(len(unit), dtype=torch.bool)].mean().item()
        options = pipe.options(max_new_tokens=12, eos_token_ids=[], stop_strings=[])
        runs = [(x, generate(pipe, x, options, pipe.context).tokens) for x in xs]
        row = (f"{spec:<36} text positions: {len(set(logits.argmax(-1).tolist()))}/{len(h)} argmaxes, cosine "
               f"{cos:.3f}; top-1 p50 {torch.softmax(logits, -1).max(-1).values.median():.2f}; greedy distinct "
               f"{[path_shape(t)['distinct'] for _, t in runs]}, shared {len(set(runs[0][1]) & set(runs[1][1]))}")
        if kw.get("p") == "1":
            with torch.no_grad():
                ref = [forced_logits(pipe, x, t) for x, t in runs]
            row += "".join(f"; {name} {agreement(pipe, linears, runs, ref, fn):.3f}" for name, fn in PERTURB)
        print(f"{row} ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
