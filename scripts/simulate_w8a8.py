"""Simulated int8 (W8A8) of a checkpoint's decoder in torch: which part of int8 costs what, without onnxruntime.

    python scripts/simulate_w8a8.py CKPT [VARIANT ...]

Loads CKPT (fp32 reference; a `checkpoint random` output finds its CLIP directory), answers 2 questions about the
built-in shapes picture (12 greedy tokens each, end-of-sequence ignored), records every decoder Linear's input max |x|
per tensor and per channel over those passes (the calibration: the same samples, so the ranges are the best case),
then teacher-forces the same tokens with the decoder's Linear layers rounded as int8 would round them: weights
symmetric per output channel, activations symmetric per tensor with the recorded range ("static", what `tgedge
quantize --precision int8` writes) or per token ("token"), optionally after SmoothQuant's per-channel migration
(s_j = max|X_j|^alpha / max|W_j|^(1-alpha)), alpha fixed or searched per input ("smooth search": what `tgedge
quantize --smooth search` computes, calibration.smooth.search_scales; q/k/v and gate/up share their input's s as in
the graphs, o_proj is left alone). Prints, per variant, top-1 agreement, KL max (nats) and min logits
cosine against the fp32 logits: the figures `tgedge validate` judges the decoder by. The LM head of a tied
checkpoint is left in fp32 (its table is the embedding's). Variants: all by default, or the names given.
"""
import re, sys, tempfile, time
from pathlib import Path
import numpy as np, torch
import torch.nn.functional as F
from tgedge.checkpoint import load_model
from tgedge.reference import TorchPipeline
from tgedge.generate import forced_logits, generate
from tgedge.model_stats import _default_image

torch.set_grad_enabled(False)
ckpt_dir = sys.argv[1]
model, ckpt = load_model(ckpt_dir, None)
pipe = TorchPipeline(model, ckpt.preprocessor)
prompts = ["What is in the picture?", "What colour is the large shape?"]
linears = {n: m for n, m in model.language_model.named_modules() if isinstance(m, torch.nn.Linear)}
if not model.cfg.decoder.tie_word_embeddings:
    linears["lm_head"] = model.lm_head
print(len(linears), "linears; tied", model.cfg.decoder.tie_word_embeddings, flush=True)

def q_sym(x, amax):
    step = (amax / 127).clamp_min(1e-30)
    return torch.clamp(torch.round(x / step), -127, 127) * step

def w8(w):  # per output channel
    return q_sym(w, w.abs().amax(1, keepdim=True))

samples = []
with tempfile.TemporaryDirectory() as tmp:
    img = _default_image(Path(tmp))
    for p in prompts:
        inputs = pipe.pre(img, p)
        x = pipe.embeddings(inputs)
        opts = pipe.options(max_new_tokens=12, eos_token_ids=[], stop_strings=[])
        toks = generate(pipe, x, opts, pipe.context).tokens
        samples.append((x, toks))
print("tokens", [s[1] for s in samples], flush=True)

# pass 1: record per-Linear input amax per tensor and per channel (fp32, every sample: the calibration)
amax, camax, csq, crows = {}, {}, {}, {}
orig = {n: m.forward for n, m in linears.items()}
def recorder(n, m):
    def fwd(x):
        a = x.detach().abs().reshape(-1, x.shape[-1])
        camax[n] = torch.maximum(camax.get(n, torch.zeros(x.shape[-1])), a.amax(0))
        amax[n] = max(amax.get(n, 0.0), float(a.max()))
        csq[n] = csq.get(n, 0.0) + a.double().pow(2).sum(0)
        crows[n] = crows.get(n, 0) + a.shape[0]
        return orig[n](x)
    return fwd
for n, m in linears.items():
    m.forward = recorder(n, m)
refs = [np.asarray(forced_logits(pipe, x, t), np.float64) for x, t in samples]
for n, m in linears.items():
    m.forward = orig[n]
ratio = {n: float(camax[n].max() / camax[n].median()) for n in linears}
worst = sorted(ratio.items(), key=lambda kv: -kv[1])[:6]
print("amax/median-channel-amax worst:", [(k, round(v, 1)) for k, v in worst], flush=True)

def group_of(n):
    """The Linears that read one input (q/k/v, gate/up) share one s, as in the graphs (calibration/smooth.py)."""
    return re.sub(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)$", ".in", n)

def searched():
    """s per input from calibration.smooth.search_scales (None where o_proj: not foldable in the graphs)."""
    from tgedge.calibration.smooth import search_scales
    members = {}
    for n in linears:
        members.setdefault(group_of(n), []).append(n)
    out, alphas = {}, []
    for g, ns in members.items():
        if ns[0].endswith("o_proj") or ns[0] == "lm_head":
            continue
        a = camax[ns[0]].double().numpy()
        m2 = (csq[ns[0]] / crows[ns[0]]).numpy()
        s, alpha = search_scales(a, m2, [linears[n].weight.data.double().numpy().T for n in ns])
        alphas.append(alpha)
        for n in ns:
            out[n] = None if s is None else torch.tensor(s, dtype=torch.float32)
    print("searched alphas:", {str(k): alphas.count(k) for k in sorted(set(alphas), key=str)}, flush=True)
    return out

def variant(wq=True, act=None, alpha=None, skip=()):
    """act: None | 'static' | 'token'; alpha: SmoothQuant migration strength, or "search" (per input)."""
    saved = {}
    found = searched() if alpha == "search" else None
    for n, m in linears.items():
        if any(s in n for s in skip):
            continue
        W, b = m.weight.data, m.bias
        s = None
        if found is not None:
            s = found.get(n)
        elif alpha is not None:
            s = (camax[n].clamp_min(1e-5) ** alpha) / (W.abs().amax(0).clamp_min(1e-5) ** (1 - alpha))
        Ws = W * s if s is not None else W
        Wq = w8(Ws) if wq else Ws
        rng = float((camax[n] / s).max()) if s is not None else amax[n]
        def fwd(x, Wq=Wq, b=b, s=s, rng=rng):
            xs = x / s if s is not None else x
            if act == "static":
                xs = q_sym(xs, torch.tensor(rng))
            elif act == "token":
                xs = q_sym(xs, xs.abs().amax(-1, keepdim=True))
            return F.linear(xs, Wq, b)
        saved[n] = m.forward
        m.forward = fwd
    try:
        outs = [np.asarray(forced_logits(pipe, x, t), np.float64) for x, t in samples]
    finally:
        for n, f in saved.items():
            linears[n].forward = orig[n]
    a, b = np.concatenate(refs), np.concatenate(outs)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    pa = np.exp(a - a.max(-1, keepdims=True)); pa /= pa.sum(-1, keepdims=True)
    lb = b - b.max(-1, keepdims=True); lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    la = np.log(pa + 1e-300)
    kl = (pa * (la - lb)).sum(-1)
    return {"top1": round(float(np.mean(a.argmax(-1) == b.argmax(-1))), 3), "kl_max": round(float(kl.max()), 3),
            "min_cos": round(float(cos.min()), 4)}

RUNS = {"w8 only": dict(),
        "a8 static only": dict(wq=False, act="static"),
        "w8a8 static": dict(act="static"),
        "w8a8 static smooth0.5": dict(act="static", alpha=0.5),
        "a8 static smooth0.5, fp32 weights": dict(wq=False, act="static", alpha=0.5),
        "w8a8 per-token smooth0.5": dict(act="token", alpha=0.5),
        "w8a8 static smooth1.0": dict(act="static", alpha=1.0),
        "w8a8 static smooth search": dict(act="static", alpha="search")}
wanted = sys.argv[2:] or list(RUNS)
unknown = [w for w in wanted if w not in RUNS]
if unknown:
    sys.exit(f"unknown variant(s) {unknown}: choose from {list(RUNS)}")
for name in wanted:
    kw = RUNS[name]
    t = time.time()
    print(f"{name:40s} {variant(**kw)}  {time.time()-t:.0f}s", flush=True)
