"""Teacher-forced logits of export variants against a reference export on one text prompt (671 token ids, 24
positions, the reference's greedy tokens): relative L2, top-1 agreement, mean and max KL, one JSON line each.

    python scripts/logit_error.py REFERENCE_EXPORT VARIANT_EXPORT ...
"""
import json
import sys

import numpy as np

from tgedge.runtime.pipeline import Pipeline
from tgedge.generate import forced_logits

def logsm(x): x = x - x.max(-1, keepdims=True); return x - np.log(np.exp(x).sum(-1, keepdims=True))
ref_dir, variants = sys.argv[1], sys.argv[2:]
L, N = 671, 24
with Pipeline(ref_dir, stages=("embed", "decoder")) as p:
    vocab = p.contract.stages["decoder"].outputs[0].shape[-1]
    ids = ((np.arange(L, dtype=np.int64) * 7919 + 11) % (vocab - 1))[None] + 1
    x = p.embed_tokens(ids)
    p.setup_cache(L + N); toks = [int(np.argmax(p.prefill(x)))]
    for i in range(N - 1): toks.append(int(np.argmax(p.decode_one_token(toks[-1], L + i))))
    p.clear_cache()
    ref = forced_logits(p, x, toks)
for v in variants:
    with Pipeline(v, stages=("embed", "decoder")) as p:
        got = forced_logits(p, x, toks)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    kl = (np.exp(logsm(ref)) * (logsm(ref) - logsm(got))).sum(-1)
    print(json.dumps({"variant": v, "rel_l2": round(rel, 5), "top1": round(top1, 3), "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}), flush=True)
