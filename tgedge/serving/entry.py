"""The `tgedge` entry model (Triton Python backend, decoupled): image bytes + question in, the answer streamed out.

One instance holds one `tgedge.runtime.Pipeline` over the export copied into its version directory. The stages
named in its `bls_stages` parameter (text_guide and vision) are runners that call the repository's stage models
through BLS, so Triton's dynamic batcher batches them across requests; fusion, embed and the decoder run in this
instance on its `runtime_backend`. Each request is read and encoded in a thread of its own; then

- in-flight batching (a static-cache export on onnxruntime, or TensorRT engines built with --max-batch N > 1:
  `runtime.batched.batching_problem` is None): one
  `runtime.scheduler.Scheduler` of `max_inflight` slots decodes every request in shared decoder steps, newcomers
  joining between steps; up to `max_inflight` more wait for a slot, encoded;
- otherwise (a growing-cache export, TensorRT engines of one sequence, `max_inflight` 1): each request decodes with its own KV
  cache on shared sessions, at most `max_inflight` at once.

`execute` waits for room, so the rest wait in Triton's queue. A request's error (its image, its prompt's length,
its stream) is its own; only a failing decoder call fails the requests it decoded together.

Imported by the model.py `tgedge triton` writes, inside the server only.
"""

from __future__ import annotations

import copy
import io
import json
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tgedge.contract import Stage, TensorMeta
from tgedge.conversation import GUIDES, Conversation
from tgedge.errors import TgedgeError, as_user_error
from tgedge.generate import Answer, fit_to_context, text_stream
from tgedge.preprocess import load_image
from tgedge.runtime.backends import make_runner
from tgedge.runtime.batched import batching_problem
from tgedge.runtime.cache import make_cache
from tgedge.runtime.pipeline import Pipeline
from tgedge.runtime.runner import BaseRunner
from tgedge.runtime.scheduler import Scheduler
from tgedge.sampling import StopCriteria
from tgedge.serving.conversations import Conversations
from tgedge.serving.protocol import CONVERSATIONS, DEFAULTS, KEPT_PER_CACHED, OPTIONS, REQUEST, bound_problem
from tgedge.serving.stage import error_response, parameters


CANCEL_POLL_S = 0.1  # how often a request waiting for a slot looks whether its client has gone


class Cancelled(Exception):
    """The client went away (Triton cancelled the request): stop decoding."""


class RequestImage(io.BytesIO):
    """The request's image bytes, named in messages as the client sent them (no file name)."""

    def __str__(self) -> str:
        return f"request image ({len(self.getbuffer())} bytes)"


class TritonModelRunner(BaseRunner):
    """A stage served by another model of the repository, called through BLS (Triton batches it across requests).
    Its inputs and outputs are the stage contract's."""

    def __init__(self, stage: Stage, model: str):
        super().__init__(stage.name)
        self.stage, self.model = stage, model

    def activate_impl(self) -> None:
        pass  # BLS is only possible inside execute; the stage model's readiness is Triton's to check

    def deactivate_impl(self) -> None:
        pass

    def get_input_metadata_impl(self) -> dict[str, TensorMeta]:
        return {t.name: t for t in self.stage.inputs}

    def get_output_metadata_impl(self) -> dict[str, TensorMeta]:
        return {t.name: t for t in self.stage.outputs}

    def infer_impl(self, feed: dict, keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=self.model, requested_output_names=self.stage.output_names,
            inputs=[pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in feed.items()])
        response = request.exec()
        if response.has_error():
            raise TgedgeError(f"stage model {self.model!r}: {response.error().message()}")
        return {n: np.array(pb_utils.get_output_tensor_by_name(response, n).as_numpy())
                for n in self.stage.output_names}


def read_request(request) -> dict:
    """The request's tensors as Python values: image bytes, question text, options (defaults filled in)."""
    values = {}
    for f in REQUEST:
        tensor = pb_utils.get_input_tensor_by_name(request, f.name)
        if tensor is None:
            if not f.optional:
                raise TgedgeError(f"missing input {f.name!r}")
            values[f.name] = DEFAULTS[f.name]
            continue
        array = tensor.as_numpy()
        if f.name == "image":
            if array.size == 0:
                raise TgedgeError("input 'image' is empty (expected the image file's bytes)")
            values[f.name] = array.tobytes()
            continue
        if f.name == "images":
            items = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]
            if not items or any(not v for v in items):
                raise TgedgeError("input 'images' holds an empty item (expected one image file's bytes each)")
            values[f.name] = items
            continue
        if array.size != 1:
            raise TgedgeError(f"input {f.name!r} must hold one value (got {array.size})")
        value = array.reshape(-1)[0]
        if f.dtype == "bytes":
            try:
                value = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError as e:
                raise TgedgeError(f"input {f.name!r} is not UTF-8 text (byte at {e.start})") from None
        else:
            value = value.item()
            problem = bound_problem(f, value)
            if problem:
                raise TgedgeError(f"input {f.name!r} {problem}")
        values[f.name] = value
    if values["image"] is not None and values["images"] is not None:
        raise TgedgeError("inputs 'image' and 'images' both given: send one image as 'image' or every image as "
                          "'images'")
    values["images"] = [values.pop("image")] if values["image"] is not None else values["images"] or []
    if values["conversation"] is not None:
        if values["raw"] or values["guide"] is not None:
            raise TgedgeError("a conversation's turn takes the question alone (no raw, no guide): the server renders "
                              "the whole conversation with the chat template")
        if values["conversation_guide"] not in GUIDES:
            raise TgedgeError(f"input 'conversation_guide' {values['conversation_guide']!r}: choose from "
                              f"{', '.join(GUIDES)}")
    return values


class Entry:
    """The model instance's state: the pipeline, and either one scheduler decoding every request together (a
    static-cache export whose decoder batches: `runtime.batched.batching_problem`) or a KV cache per request."""

    def __init__(self, export_dir: Path, params: dict[str, str]):
        self.backend = params.get("runtime_backend") or "onnxruntime"
        self.bls = [s for s in (params.get("bls_stages") or "").split(",") if s]
        if "decoder" in self.bls:
            raise TgedgeError("bls_stages: the decoder runs in the entry model (its KV cache stays here)")
        self.threads = int(params.get("threads") or 0)
        self.decoder_threads = int(params.get("decoder_threads") or self.threads)  # 0: ONNX Runtime's default
        inflight = int(params.get("max_inflight") or 1)
        self.log = pb_utils.Logger
        self.pipe = Pipeline(export_dir, self.backend, runner_factory=self._runner)
        self.scheduler: Scheduler | None = None
        problem = batching_problem(self.pipe) if inflight > 1 else "max_inflight is 1"
        if problem is None:
            # max_inflight slots decode; as many more requests are read and encoded meanwhile, waiting for a slot.
            # The semaphore is the bound: a slot freed in a step is taken at the next, so the queue may briefly hold
            # every admitted request
            admitted = 2 * inflight
            try:
                self.scheduler = Scheduler(self.pipe, slots=inflight, max_waiting=admitted)
            except BaseException:  # its buffers did not fit, say: the sessions go with the instance
                self.pipe.close()
                raise
            self.log.log_info(f"tgedge: in-flight batching, one scheduler of {inflight} slots")
        else:
            admitted = inflight
            self.log.log_info(f"tgedge: each request decodes on its own, at most {inflight} at once ({problem})")
        self.admitted = threading.BoundedSemaphore(admitted)  # execute waits for room, so the rest wait in Triton
        cached = int(params.get("conversations") or CONVERSATIONS)
        self.conversations = Conversations(self._conversation, cached, KEPT_PER_CACHED * cached)
        self.pool = ThreadPoolExecutor(admitted, thread_name_prefix="tgedge-request")

    def _runner(self, manifest, graph: str) -> BaseRunner:
        if graph in self.bls:
            return TritonModelRunner(manifest.contract.stages[graph], graph)
        threads = self.decoder_threads if graph == "decoder" else self.threads
        return make_runner(self.backend, manifest, graph, threads=threads)

    def _conversation(self, images: list[bytes], guide: str) -> Conversation:
        return Conversation(self.sequence(), [load_image(RequestImage(b)) for b in images], guide)

    def sequence(self) -> Pipeline:
        """The pipeline with a KV cache of its own: one per request; the runners (sessions) are shared."""
        view = copy.copy(self.pipe)
        view.cache = make_cache(self.pipe.contract.cache)
        return view

    def submit(self, request) -> None:
        sender = request.get_response_sender()
        try:
            values = read_request(request)
        except TgedgeError as e:
            sender.send(error_response(str(e)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        # the client's going away shows on the sender (Triton >= 2.42) or the request
        cancelled = getattr(sender, "is_cancelled", None) or request.is_cancelled
        self.admitted.acquire()
        try:
            self.pool.submit(self._serve, values, sender, cancelled)
        except BaseException:
            self.admitted.release()
            raise

    def _serve(self, values: dict, sender, cancelled) -> None:
        try:
            answer = self.answer(values, sender, cancelled)
            final = pb_utils.InferenceResponse([text_tensor("answer", json.dumps(answer))])
            sender.send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:
            if isinstance(e, Cancelled) or cancelled():  # the client has gone: close, nobody to tell
                self.log.log_info("tgedge: request cancelled (the client has gone)")
                self._send_final(sender)
                return
            user = as_user_error(e)
            if user is None:  # a bug: the client gets an error, the log the traceback, the server lives on
                self.log.log_error(f"tgedge: internal error: {traceback.format_exc()}")
            self._send_error(sender, str(user) if user else f"internal error ({type(e).__name__}: {e})")
        finally:
            self.admitted.release()

    @staticmethod
    def _send_error(sender, message: str) -> None:
        Entry._send_final(sender, error_response(message))

    @staticmethod
    def _send_final(sender, response=None) -> None:
        """The request's last response (or none: where Triton closed a cancelled request already, a no-op)."""
        try:
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001 - the client is gone: nobody to tell
            pass

    def answer(self, values: dict, sender, cancelled) -> dict:
        """Decode one request, streaming the text to `sender`; `cancelled()` says the client has gone."""
        start = time.perf_counter()

        def on_text(piece: str) -> None:
            if cancelled():
                raise Cancelled
            sender.send(pb_utils.InferenceResponse([text_tensor("text", piece)]))

        options = self.pipe.options(**{k: values[k] for k in OPTIONS})
        extra = {}
        if values["conversation"] is not None:  # on a KV cache of the conversation's own (not in shared steps)
            if cancelled():
                raise Cancelled
            answer, extra = self.conversations.turn(values["conversation"], values["images"],
                                                    values["conversation_guide"],
                                                    lambda c: c.ask(values["question"], options, on_text))
        else:
            images = [load_image(RequestImage(b)) for b in values["images"]] or None  # None: text-only
            if cancelled():
                raise Cancelled
            if self.scheduler is None:
                answer = self.sequence().answer(images, values["question"], options, raw=values["raw"],
                                                on_text=on_text, guide=values["guide"])
            else:
                answer = self._scheduled(images, values, options, on_text, cancelled, start)
        result = {**answer.to_dict(), **extra}
        result["timings"]["server_s"] = round(time.perf_counter() - start, 6)
        return result

    def _scheduled(self, image, values: dict, options, on_text, cancelled, start: float) -> Answer:
        """Encode here (concurrent newcomers' BLS stages batch in Triton), decode in the scheduler's shared steps;
        the text streams from its stepping thread, and a client gone while waiting for a slot cancels it."""
        inputs = self.pipe.pre(image, values["question"], values["raw"], values["guide"])
        fit_to_context(int(inputs.input_ids.shape[1]), options.max_new_tokens, self.pipe.context)  # before encoding
        embeddings = self.pipe.embeddings(inputs)
        encoded = time.perf_counter()
        decode = self.pipe.pre.tokenizer.decode
        request = self.scheduler.submit_inputs(inputs, options, text_stream(decode, StopCriteria(options, decode),
                                                                            on_text), embeddings)
        while not request.wait(CANCEL_POLL_S):
            if cancelled():
                request.cancel()
        answer = request.result()
        answer.timings = {"preprocess_encode_s": encoded - start, **answer.timings}
        return answer

    def close(self) -> None:
        self.conversations.close()
        if self.scheduler is not None:
            self.scheduler.close()  # requests still decoding fail: the pool's threads answer them and return
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.pipe.close()


def text_tensor(name: str, text: str):
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = parameters(config)
        version = Path(args["model_repository"]) / args["model_version"]
        self.entry = Entry(version / (params.get("export") or "export"), params)

    def execute(self, requests):
        for request in requests:
            self.entry.submit(request)
        return None

    def finalize(self):
        self.entry.close()
