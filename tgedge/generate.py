"""The decode loop and the answer flow, shared by the PyTorch reference and the torch-free runtime.

A pipeline (TorchPipeline, runtime.Pipeline) provides the stages; this module only strings them together:
`prefill(x) -> logits`, `decode_one_token(token, pos) -> logits` over a KV cache set up by
`setup_cache(max_len)` and dropped by `clear_cache()` (gpt-fast style; the loop knows nothing of tokens' text).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from tgedge.errors import TgedgeError
from tgedge.sampling import GenerationOptions, Sampler, StopCriteria


@dataclass
class GenerationResult:
    tokens: list[int]
    timings: dict[str, float] = field(default_factory=dict)  # seconds


@dataclass
class Answer:
    text: str
    tokens: list[int]
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
                "timings": {k: round(v, 6) for k, v in self.timings.items()}}


def fit_to_context(prompt_len: int, max_new_tokens: int, context: int) -> int:
    """How many tokens may be generated; a prompt that leaves no room is a user error."""
    if prompt_len >= context:
        raise TgedgeError(f"prompt is {prompt_len} tokens (image tokens included), longer than the context ({context})")
    return min(max_new_tokens, context - prompt_len)


def generate(pipe, x: Any, options: GenerationOptions, context: int, stop: StopCriteria | None = None,
             on_token: Callable[[int], None] | None = None, pick: Callable[[Any], int] | None = None,
             on_step: Callable[[str, float], None] | None = None, past: int | None = None) -> GenerationResult:
    """Greedy or sampled decoding from prompt embeddings x (1, T, D): the one decode loop (answers, validate's
    teacher forcing and the bench all run it). `pick(logits) -> token` is the token source (default: the sampler of
    `options`; teacher forcing gives the known tokens); `on_step(name, seconds)` is told each step's time,
    `prefill` then `decode_token` (the pick included, `on_token` not: what the bench times).

    `past`: a conversation's turn (`tgedge.conversation`): the KV cache, set up by the caller and kept after the
    call, holds `past` positions of the prompt already and x is the rest of it; None: a cache of its own."""
    t = x.shape[1] + (past or 0)
    n = fit_to_context(t, options.max_new_tokens, context)
    pick, stop = pick or Sampler(options).pick, stop or StopCriteria(options)
    if past is None:
        pipe.setup_cache(t + n)
    else:
        pipe.truncate_cache(past)
    try:
        start = time.perf_counter()
        tokens = [pick(pipe.prefill(x))]
        first = time.perf_counter()
        if on_step:
            on_step("prefill", first - start)
        if on_token:
            on_token(tokens[-1])
        while len(tokens) < n and not stop.done(tokens):
            step = time.perf_counter()
            tokens.append(pick(pipe.decode_one_token(tokens[-1], t + len(tokens) - 1)))
            if on_step:
                on_step("decode_token", time.perf_counter() - step)
            if on_token:
                on_token(tokens[-1])
        end = time.perf_counter()
    finally:
        if past is None:
            pipe.clear_cache()
    steps = max(len(tokens) - 1, 1)
    return GenerationResult(tokens, {"prefill_s": first - start, "decode_s": end - first,
                                     "decode_tokens_per_s": steps / max(end - first, 1e-9)})


def forced_logits(pipe, x: Any, tokens: list[int]) -> np.ndarray:
    """Teacher forcing through the decode path: the logits (n, V) the pipeline gives before each of `tokens` when
    fed the prompt embeddings x (1, T, D) and then `tokens[:-1]` one at a time (what `tgedge validate` compares).
    `generate`'s loop with the known tokens as its token source, no stop criteria."""
    logits: list[np.ndarray] = []

    def forced(step_logits) -> int:
        logits.append(np.asarray(step_logits))
        return tokens[len(logits) - 1]

    options = GenerationOptions(max_new_tokens=len(tokens))  # no EOS, no stop strings: every token is fed
    generate(pipe, x, options, x.shape[1] + len(tokens), pick=forced)
    return np.stack(logits)


def text_stream(decode: Callable[[list[int]], str], stop: StopCriteria,
                on_text: Callable[[str], None]) -> Callable[[int], None]:
    """`on_token(id)` that tells `on_text` each new piece of the answer's text as the tokens come, never past a stop
    string (what `tgedge run` prints as it streams; the server streams the same pieces)."""
    tokens: list[int] = []
    shown = ""

    def on_token(token: int) -> None:
        nonlocal shown
        tokens.append(token)
        text = stop.clean(decode(tokens))
        if len(text) > len(shown) and text.startswith(shown):
            on_text(text[len(shown):])
            shown = text

    return on_token


def answer_text(pipe, x: Any, options: GenerationOptions, on_text: Callable[[str], None] | None = None,
                past: int | None = None) -> tuple[str, GenerationResult]:
    """`generate` within the pipeline's context, stopping at the options' stop criteria, the text streamed to
    `on_text` as it grows; the answer's text (stop strings cut) and the result. `past`: as for `generate`."""
    decode = pipe.pre.tokenizer.decode
    stop = StopCriteria(options, decode)
    on_token = text_stream(decode, stop, on_text) if on_text is not None else None
    result = generate(pipe, x, options, pipe.context, stop, on_token=on_token, past=past)
    return stop.clean(decode(result.tokens)).strip(), result


class AnswerMixin:
    """`answer()` for a pipeline with `pre` (Preprocessor), `context`, `embeddings(inputs)` and the decode steps."""

    def options(self, **kw) -> GenerationOptions:
        kw.setdefault("eos_token_ids", self.pre.spec.eos_token_ids)
        kw.setdefault("stop_strings", self.pre.spec.template.stop_strings)
        return GenerationOptions(**kw)

    def answer(self, image, question: str, options: GenerationOptions | None = None, raw: bool = False,
               on_text: Callable[[str], None] | None = None, guide: str | None = None) -> Answer:
        start = time.perf_counter()
        return self.answer_inputs(self.pre(image, question, raw, guide), options, on_text, start)

    def answer_inputs(self, inputs, options: GenerationOptions | None = None,
                      on_text: Callable[[str], None] | None = None, start: float | None = None,
                      embeddings: Any = None) -> Answer:
        """`answer()` from inputs already preprocessed (`start`: when preprocessing began, for the timings);
        `embeddings`: this pipeline's prompt embeddings of `inputs` where the caller has them already (validate)."""
        options = options or self.options()
        start = time.perf_counter() if start is None else start
        x = self.embeddings(inputs) if embeddings is None else embeddings
        encoded = time.perf_counter()
        text, result = answer_text(self, x, options, on_text)
        timings = {"preprocess_encode_s": encoded - start, **result.timings}
        return Answer(text, result.tokens, int(inputs.input_ids.shape[1]), timings)
