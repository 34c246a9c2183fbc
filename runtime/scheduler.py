"""In-flight batching: requests join a running batch between decoder steps (TensorRT-LLM's in-flight batching,
vLLM's continuous batching), torch-free and without Triton.

    with pipe.scheduler(slots=8) as sched:
        a = sched.submit("cat.png", "what is it?")
        b = sched.submit("dog.png", "what colour?", pipe.options(temperature=0.7, seed=3))
        for token in a.tokens():      # streamed as each decoder step makes it
            ...
        print(b.result().text)

One thread steps the decoder (`runtime.batched.BatchedDecoder`): at each step the cancelled requests leave, the
waiting ones are admitted into free slots first come first served (their image and question encoded, their prompt
prefilled), then one decoder call makes a token for every active slot. Each request has its own sampling settings,
seed and stop criteria (`tgedge.sampling`, as a batch-1 answer has), so its tokens are the ones `pipe.answer` gives.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from typing import Callable, Iterator

from tgedge.errors import TgedgeError
from tgedge.generate import Answer, fit_to_context
from tgedge.runtime.batched import BatchedDecoder
from tgedge.sampling import GenerationOptions, Sampler, StopCriteria

_END = object()  # the token stream's end


class Request:
    """A submitted request: `tokens()` streams its token ids, `result()` waits for its `Answer`, `cancel()` ends it
    at the next step. A failed, cancelled or refused request raises its one-line `TgedgeError` from both."""

    def __init__(self, rid: int, scheduler: "Scheduler", inputs, options: GenerationOptions, limit: int,
                 on_token: Callable[[int], None] | None, embeddings=None):
        self.id, self.inputs, self.options, self.limit = rid, inputs, options, limit
        self.embeddings = embeddings  # the prompt's (1, T, D), when the caller encoded it; else encoded at admission
        self.prompt_tokens = int(inputs.input_ids.shape[1])
        self.sampler = Sampler(options)
        self.stop = StopCriteria(options, scheduler.decode_text)
        self.generated: list[int] = []
        self.slot: int | None = None  # the slot it decoded in (kept after it finished)
        self.error: BaseException | None = None
        self.cancelled = False
        self.timings: dict[str, float] = {"submitted": time.perf_counter()}
        self._scheduler, self._on_token = scheduler, on_token
        self._stream: queue.Queue = queue.Queue()
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._scheduler._cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        """True once the request has finished (answered, failed or cancelled)."""
        return self._done.wait(timeout)

    def tokens(self, timeout: float | None = None) -> Iterator[int]:
        """Token ids as they are made (one reader), then the request's error, if it has one."""
        while True:
            try:
                item = self._stream.get(timeout=timeout)
            except queue.Empty:
                raise TgedgeError(f"request {self.id}: no token within {timeout} s") from None
            if item is _END:
                break
            yield item
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> Answer:
        if not self._done.wait(timeout):
            raise TgedgeError(f"request {self.id}: not finished within {timeout} s")
        if self.error is not None:
            raise self.error
        text = self.stop.clean(self._scheduler.decode_text(self.generated)).strip()
        return Answer(text, list(self.generated), self.prompt_tokens, self._timings())

    def _timings(self) -> dict[str, float]:
        t = self.timings
        end, first = t.get("finished", 0.0), t.get("first_token", 0.0)
        steps = max(len(self.generated) - 1, 1)
        return {"queued_s": t.get("admitted", end) - t["submitted"], "prefill_s": first - t.get("admitted", first),
                "decode_s": end - first, "decode_tokens_per_s": steps / max(end - first, 1e-9)}

    # -- the scheduler's side -----------------------------------------------------------------------------------
    def _emit(self, token: int) -> bool:
        """A new token; True when the request is done (its length, a stop criterion)."""
        self.generated.append(token)
        self._stream.put(token)
        if self._on_token is not None:
            self._on_token(token)
        return len(self.generated) >= self.limit or self.stop.done(self.generated)

    def _finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.timings["finished"] = time.perf_counter()
        self._stream.put(_END)
        self._done.set()


class Scheduler:
    """In-flight batching over `slots` sequences of a static-cache export's decoder, at most `max_waiting` requests
    queued for a slot. `thread` False: no stepping thread; the caller drives `step()` (tests, a host's own loop).

    The scheduler's KV cache is its own: the pipeline's `answer()` may run beside it (from one other thread)."""

    def __init__(self, pipe, slots: int = 8, max_waiting: int = 64, thread: bool = True):
        if not (isinstance(max_waiting, int) and not isinstance(max_waiting, bool) and max_waiting >= 1):
            raise TgedgeError(f"max_waiting must be an integer >= 1 (got {max_waiting!r})")
        self.pipe, self.max_waiting = pipe, max_waiting
        self.decoder = BatchedDecoder(pipe, slots)
        self.decode_text = pipe.pre.tokenizer.decode
        self._waiting: deque[Request] = deque()
        self._active: dict[int, Request] = {}  # slot -> its request; the stepping thread's alone
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._closed: str | None = None  # why, once closed
        self._thread = threading.Thread(target=self._loop, name="tgedge-scheduler", daemon=True) if thread else None
        if self._thread is not None:
            self._thread.start()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------------------------------
    def submit(self, image, question: str, options: GenerationOptions | None = None, raw: bool = False,
               guide: str | None = None, on_token: Callable[[int], None] | None = None) -> Request:
        """Preprocess here (a bad image or question raises now, in the caller's thread), queue for a slot."""
        return self.submit_inputs(self.pipe.pre(image, question, raw, guide), options, on_token)

    def submit_inputs(self, inputs, options: GenerationOptions | None = None,
                      on_token: Callable[[int], None] | None = None, embeddings=None) -> Request:
        """Inputs already preprocessed. `on_token(id)` is called in the stepping thread as each token is made (what
        it raises fails its request alone). `embeddings`: the prompt's, `pipe.embeddings(inputs)`, encoded by the
        caller (in its own thread, so that newcomers' image stages run beside the decoding, and batch where a
        server batches them); without them the stepping thread encodes the request when it is admitted."""
        options = options or self.pipe.options()
        limit = fit_to_context(int(inputs.input_ids.shape[1]), options.max_new_tokens, self.pipe.context)
        with self._lock:
            if self._closed is not None:
                raise TgedgeError(f"request refused: the scheduler is closed ({self._closed})")
            if len(self._waiting) >= self.max_waiting:
                raise TgedgeError(f"request refused: {len(self._waiting)} requests already wait for a slot (the "
                                  f"scheduler's bound, max_waiting={self.max_waiting}): retry later")
            request = Request(next(self._ids), self, inputs, options, limit, on_token, embeddings)
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def _cancel(self, request: Request) -> None:
        with self._lock:
            request.cancelled = True
            self._lock.notify_all()

    @property
    def pending(self) -> int:
        """Requests waiting for a slot or decoding."""
        with self._lock:
            return len(self._waiting) + len(self._active)

    # -- stepping -----------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Cancelled requests leave, waiting ones are admitted into free slots (first come first served), then one
        decoder call for every active slot. True while requests remain."""
        for slot, request in list(self._active.items()):
            if request.cancelled:  # its slot is a newcomer's in this same step
                self._end(slot, TgedgeError(f"request {request.id}: cancelled after {len(request.generated)} tokens"))
        with self._lock:
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
                request._finish(TgedgeError(f"request {request.id}: cancelled before it started"))
            admitted = [self._waiting.popleft() for _ in range(min(self.decoder.free, len(self._waiting)))]
        for request in admitted:
            self._admit(request)
        if self._active:
            self._decode()
        with self._lock:
            return bool(self._waiting or self._active)

    def _admit(self, request: Request) -> None:
        """Encode and prefill a newcomer into a slot; an error there is the request's alone."""
        slot = request.slot = self.decoder.acquire()
        self._active[slot] = request
        request.timings["admitted"] = time.perf_counter()
        try:
            x = request.embeddings if request.embeddings is not None else self.pipe.embeddings(request.inputs)
            request.embeddings = None  # the slot holds them now
            logits = self.decoder.prefill(slot, x)
            request.timings["first_token"] = time.perf_counter()
            done = request._emit(request.sampler.pick(logits))
        except Exception as e:  # a stage's failure or the request's own callback's: this request's
            self._end(slot, e)
            return
        if done:
            self._end(slot)

    def _decode(self) -> None:
        try:
            logits = self.decoder.decode({slot: r.generated[-1] for slot, r in self._active.items()})
        except Exception as e:  # one call for all: every active request shares its failure
            for slot in list(self._active):
                self._end(slot, e)
            return
        for slot, request in list(self._active.items()):
            try:
                done = request._emit(request.sampler.pick(logits[slot]))
            except Exception as e:
                self._end(slot, e)
                continue
            if done:
                self._end(slot)

    def _end(self, slot: int, error: BaseException | None = None) -> None:
        """The request in `slot` finishes (or fails) and the slot is free for the next step's newcomers."""
        request = self._active.pop(slot)
        self.decoder.release(slot)
        request._finish(error)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._closed is None and not self._waiting and not self._active:
                    self._lock.wait()
                if self._closed is not None:
                    return
            try:
                self.step()
            except BaseException as e:  # a defect in the stepping itself: no request may wait forever on it
                self._shut(f"the stepping thread failed: {type(e).__name__}: {e}", e)
                return

    def close(self) -> None:
        """Stop stepping; requests not finished fail (`scheduler closed`)."""
        self._shut("closed", None)

    def _shut(self, why: str, error: BaseException | None) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = why
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            request._finish(error or TgedgeError(f"request {request.id}: the scheduler was {why}"))
        for slot in list(self._active):
            request = self._active[slot]
            self._end(slot, error or TgedgeError(f"request {request.id}: the scheduler was {why}"))

