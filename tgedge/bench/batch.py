"""`tgedge bench --batch 1,4,8,16`: the decoder alone at batch B, as the scheduler drives it.

Per batch size B: a `runtime.batched.BatchedDecoder` of B slots, each prefilled with the same text-only prompt of
`prompt_tokens` ids (untimed), then `warmup` untimed and `runs` timed decoder steps, each one call decoding every
row (`BatchedDecoder.decode`: what in-flight batching does per step); each row's next token is its greedy pick,
made outside the clock. Reported per B: the step's median, p90 and mean, and tokens/s over all rows (B / median
step). Every row decodes the same prompt, so every row must pick the same tokens (`rows_agree`: a check that the
rows' lengths and positions stay apart, not a timing).

This is the anchor a served load is read against (issue 26): a server's decode tokens/s at concurrency B cannot pass
this batch-B rate of its own decoder.
"""

from __future__ import annotations

import os
import time

import numpy as np

from tgedge.bench.report import stats
from tgedge.errors import TgedgeError


def batch_level(pipe, batch: int, prompt_tokens: int, runs: int, warmup: int) -> dict:
    from tgedge.bench.genai_worker import ids_for  # the prompt the other text-only runs are given
    from tgedge.runtime.batched import BatchedDecoder

    decoder = BatchedDecoder(pipe, batch)
    x = pipe.embed_tokens(ids_for(prompt_tokens, _vocab(pipe))[None])
    picks = {}
    for _ in range(batch):
        slot = decoder.acquire()
        picks[slot] = int(np.argmax(decoder.prefill(slot, x)))
    seconds, agree, load = [], True, os.getloadavg()[0]
    for step in range(warmup + runs):
        start = time.perf_counter()
        logits = decoder.decode(picks)
        elapsed = time.perf_counter() - start
        picks = {slot: int(np.argmax(row)) for slot, row in logits.items()}
        agree = agree and len(set(picks.values())) == 1
        if step >= warmup:
            seconds.append(elapsed)
    s = stats(seconds)
    # 0.1 us: a demo step of ~0.4 ms rounded to the microsecond would disagree with tokens/s by up to 0.25 %
    return {"batch": batch, "step_ms": {"median": round(s["median"] * 1e3, 4), "p90": round(s["p90"] * 1e3, 4),
                                        "mean": round(float(np.mean(seconds)) * 1e3, 4), "n": s["n"]},
            "tokens_per_s": round(batch / s["median"], 3), "rows_agree": agree, "load": round(load, 2)}


def _vocab(pipe) -> int:
    return int(pipe.contract.stages["decoder"].outputs[0].shape[-1])


def batch_bench(model: str, backend: str, batches: tuple[int, ...], prompt_tokens: int, runs: int, warmup: int,
                threads: int = 0, spin: bool = True, progress=None) -> dict:
    """Every batch size in turn on one pipeline (its embed and decoder graphs); the report as a dict."""
    from tgedge.pipelines import open_pipeline
    from tgedge.runtime.batched import batching_problem

    pipe = open_pipeline(model, backend, None, stages=("embed", "decoder"), threads=threads, spin=spin)
    try:
        problem = batching_problem(pipe)
        if problem:
            raise TgedgeError(f"--batch: {model}: {problem}")
        room = pipe.contract.cache.max_length
        if prompt_tokens + warmup + runs > room:
            raise TgedgeError(f"--batch: --prompt-tokens {prompt_tokens} + --warmup {warmup} + --runs {runs} steps "
                              f"exceed the static cache ({room} positions, the export's max context)")
        levels = []
        for b in batches:
            levels.append(batch_level(pipe, b, prompt_tokens, runs, warmup))
            if progress:
                progress()
    finally:
        pipe.close()
    one = next((lv for lv in levels if lv["batch"] == 1), None)
    for lv in levels:
        lv["vs_batch1"] = round(lv["tokens_per_s"] / one["tokens_per_s"], 3) if one else None
    cache = pipe.contract.cache
    return {"model": str(model), "backend": backend, "cache": cache.mode, "prompt_tokens": prompt_tokens,
            "runs": runs, "warmup": warmup, "threads": threads, "levels": levels}


def batch_lines(report: dict) -> list[str]:
    lines = [f"{report['model']} ({report['backend']}, {report['cache']} cache): one decoder step at batch B, "
             f"{report['prompt_tokens']} cached positions, median of {report['runs']}"]
    for lv in report["levels"]:
        ratio = "" if lv["vs_batch1"] is None else f"  {lv['vs_batch1']:5.2f}x batch 1"
        agree = "" if lv["rows_agree"] else "  ROWS DISAGREE"
        step = lv["step_ms"]
        lines.append(f"  batch {lv['batch']:>4}  step {step['median']:9.2f} ms (p90 {step['p90']:.2f})"
                     f"  {lv['tokens_per_s']:9.1f} tok/s all rows{ratio}{agree}")
    return lines
