"""`tgedge client`: ask the `tgedge` entry model over gRPC streaming; the answer as `tgedge run` gives it.

    with Session("127.0.0.1:8001") as s:
        reply = s.ask(image_bytes, "what color is the square?", on_text=print)
        reply.answer  # {"text", "tokens", "prompt_tokens", "timings"}: `tgedge run --json`'s object
        s.ask(image_bytes, "and the circle?", conversation="c1")   # a conversation's first turn ...
        s.ask(None, "is it bigger?", conversation="c1")            # ... and a follow-up (the KV cache reused)

One stream per session, one request in flight on it at a time; a load test runs one session per worker.
Errors (no server, no such model, a request the server refuses) are `TgedgeError`s: one line at the CLI.
"""

from __future__ import annotations

import json
import math
import queue
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from tgedge.errors import TgedgeError
from tgedge.serving.protocol import DEFAULTS, ENTRY_MODEL, REQUEST, WIRE_TYPES, bound_problem, require_tritonclient

DEFAULT_GRPC_PORT = 8001


def grpc_target(url: str) -> str:
    """`host:port` from `host[:port]` or `grpc://host[:port]`; an HTTP URL is refused with the way out."""
    raw = url if "://" in url else f"grpc://{url}"
    parts = urlsplit(raw)
    if parts.scheme != "grpc":
        raise TgedgeError(f"{url}: tgedge client streams over gRPC: give the server's gRPC address, "
                          f"e.g. grpc://127.0.0.1:{DEFAULT_GRPC_PORT} (not {parts.scheme}://)")
    try:
        port = parts.port or DEFAULT_GRPC_PORT
    except ValueError:
        raise TgedgeError(f"{url}: not a valid port") from None
    if not parts.hostname or parts.path not in ("", "/"):
        raise TgedgeError(f"{url}: expected HOST:PORT or grpc://HOST:PORT")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def _grpc():
    require_tritonclient("client")
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    return grpcclient, InferenceServerException


def request_inputs(image: bytes | list[bytes] | None, question: str, **options) -> list:
    """The entry model's request tensors (protocol.REQUEST); options left out take the server's defaults; `image`
    one image file's bytes or a list of several (placed in order), None or [] a text-only prompt (or a
    conversation's follow-up: its images are the first turn's)."""
    grpcclient, _ = _grpc()
    values = {"question": np.array([question.encode("utf-8")], dtype=np.object_)}
    images = [image] if isinstance(image, bytes) else list(image or [])
    if len(images) == 1:
        values["image"] = np.frombuffer(images[0], dtype=np.uint8)
    elif images:
        values["images"] = np.array(images, dtype=np.object_)
    known = [k for k in DEFAULTS if k not in ("image", "images")]
    unknown = set(options) - set(known)
    if unknown:
        raise TgedgeError(f"unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    inputs = []
    for f in REQUEST:
        if f.name in values:
            value = values[f.name]
        elif options.get(f.name) is not None:
            value = (np.array([str(options[f.name]).encode("utf-8")], dtype=np.object_) if f.dtype == "bytes"
                     else np.array([_fitting(f, options[f.name])], dtype=f.dtype))
        else:
            continue
        tensor = grpcclient.InferInput(f.name, list(value.shape), WIRE_TYPES[f.dtype])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def _fitting(f, value):
    """`value` if the request field's dtype holds it: numpy would wrap an integer beyond int32 (3e9 -> negative)."""
    kind = np.dtype(f.dtype).kind
    if kind in "iu":
        info = np.iinfo(f.dtype)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not info.min <= value <= info.max:
            raise TgedgeError(f"option {f.name}: {value!r} does not fit the request's {f.dtype} field "
                              f"(expected an integer in [{info.min}, {info.max}])")
        problem = bound_problem(f, int(value))
        if problem:
            raise TgedgeError(f"option {f.name} {problem}")
    elif kind == "f" and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                          or not math.isfinite(value)):
        raise TgedgeError(f"option {f.name}: {value!r} is not a finite number")
    return value


@dataclass
class Reply:
    answer: dict  # text, tokens, prompt_tokens, timings (the server's)
    first_text_s: float | None  # when the first piece of text arrived (None: the answer has no text)
    latency_s: float


class Session:
    """One gRPC stream to a Triton server serving the `tgedge` entry model."""

    def __init__(self, url: str, model: str = ENTRY_MODEL, timeout: float = 60.0, check: bool = True):
        grpcclient, self._error_type = _grpc()
        self.url, self.target, self.model, self.timeout = url, grpc_target(url), model, timeout
        self.client = grpcclient.InferenceServerClient(url=self.target)
        self._responses: queue.Queue = queue.Queue()
        self._streaming = False
        self._count = 0
        self.guided = False  # the entry model has a text guide (from its config, by `check`)
        if check:
            self.check()

    def check(self) -> None:
        """The server answers and the model is ready; otherwise one line saying which is not."""
        wait = min(self.timeout, 10.0)
        try:
            live = self.client.is_server_live(client_timeout=wait)
        except self._error_type as e:
            raise TgedgeError(f"{self.url}: no Triton server answers there ({_message(e)})") from None
        if not live:
            raise TgedgeError(f"{self.url}: the Triton server is not live")
        try:
            ready, why = self.client.is_model_ready(self.model, client_timeout=wait), ""
        except self._error_type as e:
            ready, why = False, f": {_message(e)}"
        if not ready:
            raise TgedgeError(f"{self.url}: model {self.model!r} is not ready on this server (not in its repository, "
                              f"or it failed to load: see the server's log){why}")
        try:  # tgedge triton writes the stages the entry model calls into its config (serving.repository)
            config = self.client.get_model_config(self.model, as_json=True, client_timeout=wait)
            stages = config["config"]["parameters"]["bls_stages"]["string_value"]
        except (self._error_type, KeyError, TypeError):  # not a tgedge entry model: the server judges each request
            stages = ""
        self.guided = "text_guide" in str(stages).split(",")

    def _stream(self) -> None:
        if not self._streaming:
            self._responses = queue.Queue()  # a fresh stream: nothing of an earlier one
            self.client.start_stream(callback=lambda result, error: self._responses.put((result, error)))
            self._streaming = True

    def _restart(self) -> None:
        if self._streaming:
            try:
                self.client.stop_stream(cancel_requests=True)
            except Exception:  # noqa: BLE001 - a broken stream: it is being replaced anyway
                pass
            self._streaming = False

    def ask(self, image: bytes | list[bytes] | None, question: str, on_text=None, **options) -> Reply:
        """Stream one answer (`image`: one image's bytes, a list of several, None: a text-only prompt);
        `on_text(piece)` is called as the text grows; `conversation=ID`: the next turn of that conversation."""
        if options.get("raw") and options.get("guide") is None and self.guided:  # the server would refuse it
            from tgedge.preprocess import RAW_NEEDS_GUIDE

            raise TgedgeError(f"{self.url}: {RAW_NEEDS_GUIDE}")
        inputs = request_inputs(image, question, **options)
        self._stream()
        self._count += 1
        start = time.perf_counter()
        try:
            self.client.async_stream_infer(self.model, inputs, request_id=str(self._count),
                                           enable_empty_final_response=True)
        except self._error_type as e:
            self._restart()
            raise TgedgeError(f"{self.url}: {_message(e)}") from None
        first, answer = None, None
        while True:
            remaining = self.timeout - (time.perf_counter() - start)
            try:
                result, error = self._responses.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                self._restart()
                raise TgedgeError(f"{self.url}: no answer within {self.timeout:g} s") from None
            if error is not None:
                self._restart()  # the request is over; a stream-level failure would leave the stream unusable
                raise TgedgeError(f"{self.url}: {_message(error)}")
            text, final = result.as_numpy("text"), result.as_numpy("answer")
            if text is not None:
                first = first if first is not None else time.perf_counter() - start
                if on_text is not None:
                    on_text(text.reshape(-1)[0].decode("utf-8"))
            if final is not None:
                answer = json.loads(final.reshape(-1)[0].decode("utf-8"))
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        if answer is None:
            raise TgedgeError(f"{self.url}: the stream ended without an answer")
        return Reply(answer, first, time.perf_counter() - start)

    def close(self) -> None:
        self._restart()
        self.client.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _message(e) -> str:
    """tritonclient's exception text, on one line, without its `[StatusCode...]` prefix."""
    text = e.message() if callable(getattr(e, "message", None)) else str(e)
    return " ".join(str(text).split())
