"""One bench run and the bench: each target opened, warmed up, then run in alternating rounds; each run times the
stages through `run_stage` and the decoding through `tgedge.generate.generate`'s step hook (the loop `tgedge run`
answers with), then `tgedge.bench.report.summarize` turns the runs into the report."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

from tgedge.bench.peers import GenaiPeer
from tgedge.bench.report import summarize
from tgedge.bench.samplers import MemorySampler, PowerSampler
from tgedge.bench.targets import Target, describe_target
from tgedge.errors import TgedgeError
from tgedge.generate import generate
from tgedge.sampling import GenerationOptions


class StageClock:
    """Seconds spent in each stage a pipeline runs through its `run_stage` while the clock is on."""

    def __init__(self, pipe):
        self.pipe, self.seconds = pipe, {}

    def __enter__(self) -> "StageClock":
        inner = self.pipe.run_stage

        def timed(name, feed, **options):
            start = time.perf_counter()
            try:
                return inner(name, feed, **options)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        self.pipe.run_stage = timed  # the instance's attribute: StageFlow calls self.run_stage
        return self

    def __exit__(self, *exc) -> None:
        del self.pipe.run_stage


def _generate(pipe, x, new_tokens: int, out: dict, start: float) -> None:
    """`generate`, greedy, of exactly `new_tokens` (no EOS, no stop strings), timed through its step hook: prefill,
    TTFT from `start` (through the first token's pick), each decode step."""
    out["decode_token"] = []

    def on_step(name: str, seconds: float) -> None:
        if name == "prefill":
            out["prefill"], out["ttft"] = seconds, time.perf_counter() - start
        else:
            out["decode_token"].append(seconds)

    generate(pipe, x, GenerationOptions(max_new_tokens=new_tokens), pipe.context, on_step=on_step)


def image_run(pipe, image, prompt: str, new_tokens: int) -> dict:
    """One question about an image, stage by stage: preprocess, text guide, vision (all views), fusion, embed,
    prefill, then `new_tokens - 1` decode steps; TTFT = preprocess through the first token."""
    start = time.perf_counter()
    inputs = pipe.pre(image, prompt)
    out = {"preprocess": time.perf_counter() - start, "load": os.getloadavg()[0]}
    with StageClock(pipe) as clock:
        x = pipe.embeddings(inputs)
    out.update(clock.seconds)
    out["prompt_tokens"] = int(x.shape[1])
    out["views"] = int(inputs.pixel_values.shape[0] + (0 if inputs.crops is None else inputs.crops.shape[1]))
    _generate(pipe, x, new_tokens, out, start)
    return out


def context_run(pipe, prompt_tokens: int, new_tokens: int) -> dict:
    """Text only: a prompt of `prompt_tokens` token ids (every id a text token), prefill, then decode steps."""
    from tgedge.bench.genai_worker import ids_for  # the token ids the onnxruntime-genai peer is given too

    ids = ids_for(prompt_tokens, _vocab(pipe))[None]
    out = {"load": os.getloadavg()[0], "prompt_tokens": prompt_tokens}
    start = time.perf_counter()
    with StageClock(pipe) as clock:
        x = pipe.embed_tokens(ids)
    out.update(clock.seconds)
    _generate(pipe, x, new_tokens, out, start)
    return out


def _vocab(pipe) -> int:
    return int(pipe.contract.stages["decoder"].outputs[0].shape[-1])


@dataclass
class Settings:
    runs: int = 5
    warmup: int = 1
    new_tokens: int = 16
    prompt_tokens: tuple[int, ...] = ()  # text-only contexts, besides the image question (if any)
    image: object = None
    prompt: str | None = None
    power: bool = False


def _check(settings: Settings, pipe, target: Target) -> None:
    context = getattr(pipe, "context", None)
    if settings.runs < 1 or settings.warmup < 0 or settings.new_tokens < 2:
        raise TgedgeError("need --runs >= 1, --warmup >= 0 and --new-tokens >= 2")
    needs = [(f"--prompt-tokens {n}", n) for n in settings.prompt_tokens]
    if isinstance(pipe, GenaiPeer):
        if not settings.prompt_tokens:
            raise TgedgeError("--compare genai runs text-only prompts: give --prompt-tokens")
        return
    if settings.image is not None:
        needs.append(("the question", int(pipe.pre(settings.image, settings.prompt).input_ids.shape[1])))
    for what, n in needs:
        if context is not None and n + settings.new_tokens > context:
            raise TgedgeError(f"{target.name}: {what} ({n} tokens) + --new-tokens {settings.new_tokens} does not fit "
                              f"the context ({context})")


def _one(pipe, settings: Settings) -> dict:
    """One timed run of every measurement: the image question, then each text-only context."""
    if hasattr(pipe, "bench_run"):  # a peer times itself
        return pipe.bench_run(settings)
    out = {}
    if settings.image is not None:
        out["image"] = image_run(pipe, settings.image, settings.prompt, settings.new_tokens)
    for n in settings.prompt_tokens:
        out[f"context:{n}"] = context_run(pipe, n, settings.new_tokens)
    return out


def run_bench(targets: list[Target], settings: Settings, peaks=None, progress=None) -> dict:
    """Open every target, warm each up, then `runs` rounds in which each target runs once (alternating, so that
    the machine's load drifts over all of them alike); the floors measured on this machine before and after the runs,
    the higher taken (tgedge.floors): the CUDA device's where a target runs on a GPU backend or torch on CUDA, else
    the host's."""
    from functools import partial

    from tgedge.floors import best_of, floor_device, measure_peaks

    if settings.power and len(targets) > 1:
        raise TgedgeError("--power measures one model at a time (the board's power is not the model's alone)")
    sampler = PowerSampler() if settings.power else None  # before any work: a missing source fails fast
    opened, results = [], {}
    try:
        for target in targets:
            before = MemorySampler.rss()
            pipe = target.open(text_only=settings.image is None)
            opened.append((target, pipe))
            _check(settings, pipe, target)
            target.info = describe_target(target, pipe)
            loaded = pipe.peak_rss() if getattr(pipe, "separate_process", False) else MemorySampler.rss() - before
            results[target.name] = {"runs": [], "rss_loaded": loaded, "peak_rss": 0}
        threads = max((t.threads for t in targets), default=0)
        # the GPU's floors where any target runs there: on a GPU backend, or torch on CUDA
        device = "cuda" if any(t.device == "cuda" for t in targets) else floor_device(t.backend for t in targets)
        measure = partial(measure_peaks, device, threads)
        first = peaks or measure()  # with the models loaded, before their runs
        for target, pipe in opened:
            for _ in range(settings.warmup):
                _one(pipe, settings)
        start = time.perf_counter()
        if sampler:
            sampler.__enter__()
        try:
            for _ in range(settings.runs):
                for target, pipe in opened:
                    with MemorySampler() as memory:
                        results[target.name]["runs"].append(_one(pipe, settings))
                    peak = pipe.peak_rss() if getattr(pipe, "separate_process", False) else memory.peak
                    results[target.name]["peak_rss"] = max(results[target.name]["peak_rss"], peak)
                    if progress:
                        progress()
        finally:
            if sampler:
                sampler.__exit__(None, None, None)
        elapsed = time.perf_counter() - start  # the runs alone: the power samples end with them
        peaks = first if peaks else best_of(first, measure())  # and again after them
        if sampler:
            results[targets[0].name]["power"] = _power(sampler, elapsed,
                                                       settings.runs * settings.new_tokens * (
                                                           len(settings.prompt_tokens) + (settings.image is not None)))
    finally:
        for _, pipe in opened:
            close = getattr(pipe, "close", None)
            if close:
                close()
    return summarize(targets, settings, peaks, results)


def _power(sampler: PowerSampler, elapsed: float, tokens: int) -> dict:
    if not sampler.samples:
        raise TgedgeError(f"--power: {sampler.source} gave no readings during the run")
    avg_w = statistics.fmean(sampler.samples) / 1000
    return {"source": sampler.source, "samples": len(sampler.samples), "average_w": round(avg_w, 3),
            "energy_j": round(avg_w * elapsed, 3), "energy_per_token_j": round(avg_w * elapsed / max(tokens, 1), 4)}
