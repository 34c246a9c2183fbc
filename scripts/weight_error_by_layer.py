"""Where a decoder's error under weight rounding comes from, layer by layer (docs/SCALE.md, "Outlier channels and 8-bit
weights").

    python scripts/weight_error_by_layer.py CKPT [VARIANT ...]

Loads CKPT (fp32 reference; a `checkpoint random` output finds its CLIP directory), answers 2 questions about the
built-in shapes picture (12 greedy tokens each, end-of-sequence ignored), then teacher-forces the same tokens with the
decoder's Linear weights changed as VARIANT says (8-bit per-output-channel rounding of all of them or of one kind, or
Gaussian noise of 0.2 % of each tensor's std, about bf16's rounding) and prints top-1 agreement, KL max and median
(nats) against the unchanged logits, and the median relative error of the residual stream at the decode positions
after layers 1, 6, 12, 18 and 24: an error that grows layer on layer is amplified (chaos), one that is set by a few
layers is not. Variants: all by default, or the names given.
"""
import sys, tempfile, time, re
from pathlib import Path
import numpy as np, torch
from tgedge.checkpoint import load_model
from tgedge.reference import TorchPipeline
from tgedge.generate import forced_logits, generate
from tgedge.model_stats import _default_image, _round8
torch.set_grad_enabled(False)
model, ckpt = load_model(sys.argv[1], None)
pipe = TorchPipeline(model, ckpt.preprocessor)
lm = model.language_model
prompts = ["What is in the picture?", "What colour is the large shape?"]
with tempfile.TemporaryDirectory() as tmp:
    img = _default_image(Path(tmp))
    samples = []
    for p in prompts:
        x = pipe.embeddings(pipe.pre(img, p))
        opts = pipe.options(max_new_tokens=12, eos_token_ids=[], stop_strings=[])
        toks = generate(pipe, x, opts, pipe.context).tokens
        samples.append((x, toks))
print("tokens", [s[1] for s in samples], flush=True)
acts = []
def hook(i):
    def f(mod, inp, out):
        h = out[0] if isinstance(out, tuple) else out
        acts[-1].setdefault(i, []).append(h[0, -1].double().clone())
    return f
hs = [l.register_forward_hook(hook(i)) for i, l in enumerate(lm.layers)]
def run():
    acts.append({})
    lg = [np.asarray(forced_logits(pipe, x, t), np.float64) for x, t in samples]
    a = acts.pop()
    return np.concatenate(lg), {i: torch.stack(v) for i, v in a.items()}
ref_lg, ref_h = run()
print("residual rms after layer 1 / the last (decode positions):",
      [round(float(ref_h[i].pow(2).mean().sqrt()), 3) for i in (0, len(lm.layers) - 1)], flush=True)
linears = {n: m for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
def kl_top(a, b):
    pa = np.exp(a - a.max(-1, keepdims=True)); pa /= pa.sum(-1, keepdims=True)
    lb = b - b.max(-1, keepdims=True); lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = (pa * (np.log(pa + 1e-300) - lb)).sum(-1)
    return float(np.mean(a.argmax(-1) == b.argmax(-1))), float(kl.max()), float(np.median(kl))
def variant(name, pattern, fn):
    saved = {}
    torch.manual_seed(1)
    for n, m in linears.items():
        if re.search(pattern, n):
            saved[n] = m.weight.data
            m.weight.data = fn(m.weight.data)
    t = time.time()
    lg, h = run()
    for n, w in saved.items():
        linears[n].weight.data = w
    rel = [float((h[i] - ref_h[i]).norm(dim=-1).div(ref_h[i].norm(dim=-1)).median()) for i in range(len(lm.layers))]
    top1, klmax, klmed = kl_top(ref_lg, lg)
    n = len(rel)
    at = " ".join(f"L{i + 1} {rel[i]:.2e}" for i in sorted({0, n // 4, n // 2, 3 * n // 4, n - 1}))
    print(f"{name:28s} top1 {top1:.3f} klmax {klmax:.4f} klmed {klmed:.5f} | residual rel err {at}  "
          f"{time.time() - t:.0f}s", flush=True)
bf16 = lambda w: w.bfloat16().float()
noise = lambda e: (lambda w: w + e * w.std() * torch.randn_like(w))
V = {"w8 all": (".", _round8), "noise 0.2% all": (".", noise(2e-3)), "w8 qk": (r"(q|k)_proj", _round8),
     "w8 v o": (r"(v|o)_proj", _round8), "w8 mlp": (r"mlp", _round8), "w8 layers 0-5": (r"layers\.[0-5]\.", _round8),
     "w8 last layer": (rf"layers\.{len(lm.layers) - 1}\.", _round8)}
unknown = [k for k in sys.argv[2:] if k not in V]
if unknown:
    sys.exit(f"unknown variant(s) {unknown}: choose from {list(V)}")
for k in (sys.argv[2:] or V):
    variant(k, *V[k])
