"""In-flight batching at real size: each request's next-token logits and greedy tokens through the batched KV cache
(runtime/batched.py: prompts of different lengths joining mid-flight, slots freed and reused, every active slot
decoded in one call) against the same request decoded alone (batch 1, the export's own cache: `tgedge run`'s loop).

    python scripts/batched_parity.py EXPORT [--slots 4] [--requests 6] [--new-tokens 24] [--json F]

Text-only prompts (random token ids, seeded; lengths 9 to 70): the decoder is what batching changes. The figures
are the worst over every request and step: relative L2 of the logits (||batched - alone|| / ||alone||), max abs
difference, the greedy tokens equal or not. fp32's limit in `tgedge validate` is 8 reference noises (the 0.5 B
decoder's noise, rel. L2 of its fp32 reference against float64, is ~3e-5: docs/CI.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from tgedge.generate import generate
from tgedge.runtime.batched import BatchedDecoder
from tgedge.runtime.pipeline import Pipeline
from tgedge.sampling import GenerationOptions

LENGTHS = (9, 33, 17, 70, 25, 48, 12, 40)


def alone(pipe, ids: np.ndarray, n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and each step's logits, the request decoded by itself."""
    logits: list[np.ndarray] = []

    def pick(step):
        logits.append(np.array(step, np.float64))
        return int(np.argmax(step))

    out = generate(pipe, pipe.embed_tokens(ids), GenerationOptions(max_new_tokens=n), pipe.context, pick=pick)
    return out.tokens, logits


def batched(pipe, prompts: list[np.ndarray], n: int, slots: int) -> tuple[list[list[int]], list[list[np.ndarray]],
                                                                              dict]:
    """The same requests through one BatchedDecoder: half admitted at once, the rest one per step as slots free."""
    dec = BatchedDecoder(pipe, slots)
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[np.ndarray]] = [[] for _ in prompts]
    waiting, active = list(range(len(prompts))), {}  # slot -> request
    first = max(1, min(slots, len(prompts)) // 2 + 1)
    steps, rows, reused = 0, [], 0
    used: set[int] = set()

    def admit():
        nonlocal reused
        r = waiting.pop(0)
        slot = dec.acquire()
        reused += slot in used
        used.add(slot)
        step = dec.prefill(slot, pipe.embed_tokens(prompts[r]))
        logits[r].append(np.array(step, np.float64))
        tokens[r].append(int(np.argmax(step)))
        active[slot] = r

    for _ in range(first):
        admit()
    while active or waiting:
        if waiting and dec.free and steps >= 2:  # newcomers join between steps, mid-flight
            admit()
        for slot in [s for s, r in active.items() if len(tokens[r]) >= n]:
            dec.release(slot)
            del active[slot]
        if not active:
            continue
        out = dec.decode({slot: tokens[r][-1] for slot, r in active.items()})
        rows.append(len(out))
        steps += 1
        for slot, step in out.items():
            r = active[slot]
            logits[r].append(np.array(step, np.float64))
            tokens[r].append(int(np.argmax(step)))
    return tokens, logits, {"decode_steps": steps, "most_rows": max(rows), "slots_reused": reused}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="F")
    args = ap.parse_args()
    start = time.perf_counter()
    with Pipeline(args.export, stages=("embed", "decoder")) as pipe:
        vocab = pipe.manifest.model["decoder"]["vocab_size"]
        rng = np.random.default_rng(args.seed)
        prompts = [rng.integers(100, vocab - 1000, (1, LENGTHS[k % len(LENGTHS)]), dtype=np.int64)
                   for k in range(args.requests)]
        ref = [alone(pipe, p, args.new_tokens) for p in prompts]
        toks, logits, shape = batched(pipe, prompts, args.new_tokens, args.slots)
    rel, diff, equal = 0.0, 0.0, 0
    for (ref_tokens, ref_logits), tokens, got in zip(ref, toks, logits):
        equal += tokens == ref_tokens
        same = next((k for k, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        for a, b in zip(got[:same + 1], ref_logits):  # up to where the tokens differ the inputs are the same
            rel = max(rel, float(np.linalg.norm(a - b) / np.linalg.norm(b)))
            diff = max(diff, float(np.abs(a - b).max()))
    report = {"export": args.export, "slots": args.slots, "requests": args.requests, "new_tokens": args.new_tokens,
              "prompt_lengths": [int(p.shape[1]) for p in prompts], **shape, "tokens_equal": equal,
              "logits_max_rel_l2": rel, "logits_max_abs": diff, "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if equal == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
