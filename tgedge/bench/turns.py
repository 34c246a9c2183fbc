"""`tgedge bench --turns`: time to first token for each kind of turn a conversation has (docs/CONVERSATIONS.md).

Per run, on one pipeline, in this order (the cases alternate run by run, so the machine's drift falls on all alike):

    new_image       a first question, the vision-feature cache empty: every stage runs
    same_image      another question about the same image: the vision stage's output from the cache
    recompute       the two-turn conversation (first question, its answer, the follow-up) answered from scratch:
                    no cache of any kind, what a runtime without conversations does for a follow-up
    followup_latest the follow-up in a `Conversation` (guide latest, the default): the KV cache kept up to the first
                    image position, the re-guided image tokens and all after them prefilled
    followup_first  the same follow-up, guide first: the image tokens kept, only the new turn prefilled

The time to first token of a case is its preprocessing and encoding (the conversation's rendering, tokenising and
reuse check included) plus its prefill and first pick, as `Answer.timings` records them; each answer generates
`new_tokens` tokens (EOS ignored), which is also the length of the first turn's answer the follow-up comes after.
Every follow-up's tokens are checked against the recompute's (`tokens_equal`: a check, not a timing): for guide
latest they must be equal; guide first answers a different question of the model (the first question's image
tokens), so it is reported, not required.
"""

from __future__ import annotations

import os

from tgedge.bench.report import stats

CASES = ("new_image", "same_image", "recompute", "followup_latest", "followup_first")
FOLLOW_UP = "Is there anything else in the picture?"


def _ttft(answer) -> float:
    return answer.timings["preprocess_encode_s"] + answer.timings["prefill_s"]


def one_run(pipe, image, question: str, follow_up: str, options) -> tuple[dict, dict, dict]:
    """Each case's TTFT (s), tokens and prompt positions reused in one run."""
    from tgedge.conversation import Conversation
    from tgedge.stagecache import StageCache

    seconds, tokens, reused = {}, {}, {}
    pipe.use_stage_cache(StageCache(1 << 30))
    first = pipe.answer(image, question, options)
    seconds["new_image"] = _ttft(first)
    seconds["same_image"] = _ttft(pipe.answer(image, follow_up, options))
    pipe.use_stage_cache(None)
    for guide in ("latest", "first"):
        pipe.use_stage_cache(StageCache(1 << 30))  # a conversation's first turn fills it, as chat's does
        conv = Conversation(pipe, [image], guide)
        try:
            conv.ask(question, options)
            turn = conv.ask(follow_up, options)
        finally:
            conv.close()
        seconds[f"followup_{guide}"], tokens[guide], reused[guide] = _ttft(turn), turn.tokens, turn.reused_tokens
        if guide == "latest":  # the recompute of this very conversation, no cache of any kind
            pipe.use_stage_cache(None)
            prompt = pipe.pre.spec.template.render_turns(conv.turns[:1] + [(follow_up, None)], 1)
            guided = follow_up if pipe.pre.spec.text_guide_length else None
            again = pipe.answer(image, prompt, options, raw=True, guide=guided)
            seconds["recompute"], tokens["recompute"] = _ttft(again), again.tokens
            reused["prompt_tokens"] = again.prompt_tokens
    pipe.use_stage_cache(None)
    return seconds, tokens, reused


def turns_bench(model: str, backend: str, clip: str | None, image, question: str, runs: int, warmup: int,
                new_tokens: int, threads: int = 0, spin: bool = True, progress=None) -> dict:
    from tgedge.pipelines import open_pipeline

    pipe = open_pipeline(model, backend, clip, threads=threads, spin=spin)
    try:
        options = pipe.options(max_new_tokens=new_tokens, eos_token_ids=[], stop_strings=[])
        times = {case: [] for case in CASES}
        equal = {"followup_latest": True, "followup_first": True}
        load = os.getloadavg()[0]
        for run in range(warmup + runs):
            seconds, tokens, reused = one_run(pipe, image, question, FOLLOW_UP, options)
            equal["followup_latest"] &= tokens["latest"] == tokens["recompute"]
            equal["followup_first"] &= tokens["first"] == tokens["recompute"]
            if run >= warmup:
                for case in CASES:
                    times[case].append(seconds[case])
                if progress:
                    progress()
    finally:
        getattr(pipe, "close", lambda: None)()  # a runtime Pipeline's sessions (the torch reference has none)
    median = {case: stats(s)["median"] for case, s in times.items()}
    cases = {case: {"ttft_ms": {"median": round(median[case] * 1e3, 2),
                                "p90": round(stats(times[case])["p90"] * 1e3, 2), "n": len(times[case])}}
             for case in CASES}
    cases["same_image"]["vs"] = {"new_image": round(median["same_image"] / median["new_image"], 3)}
    for guide in ("latest", "first"):
        case = f"followup_{guide}"
        cases[case]["vs"] = {"recompute": round(median[case] / median["recompute"], 3)}
        cases[case]["reused_tokens"] = reused[guide]
        cases[case]["tokens_equal_recompute"] = equal[case]
    cases["recompute"]["prompt_tokens"] = reused["prompt_tokens"]
    return {"model": str(model), "backend": backend, "question": question, "follow_up": FOLLOW_UP,
            "new_tokens": new_tokens, "runs": runs, "warmup": warmup, "threads": threads, "load": round(load, 2),
            "cases": cases}


def turns_lines(report: dict) -> list[str]:
    lines = [f"{report['model']} ({report['backend']}): time to first token per kind of turn, median of "
             f"{report['runs']} (answers of {report['new_tokens']} tokens)"]
    for case, c in report["cases"].items():
        t = c["ttft_ms"]
        vs = "".join(f"  {r:5.3f}x {other}" for other, r in c.get("vs", {}).items())
        extra = ""
        if "reused_tokens" in c:
            extra = f"  reused {c['reused_tokens']}/{report['cases']['recompute']['prompt_tokens']} positions"
            if not c["tokens_equal_recompute"]:
                extra += "  (tokens differ from the recompute" + (": another guide)" if case.endswith("first")
                                                                  else ": A BUG)")
        lines.append(f"  {case:<16} {t['median']:10.1f} ms (p90 {t['p90']:.1f}){vs}{extra}")
    return lines
