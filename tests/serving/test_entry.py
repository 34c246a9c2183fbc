"""The entry model (tgedge/serving/entry.py) without a server: Triton's `triton_python_backend_utils` stood in for
by a few classes, requests and response senders recorded. A static-cache export decodes through one scheduler
(requests in shared decoder steps), a growing-cache one per request; both answer as `tgedge run` does, and a bad
image, a prompt beyond the context, a stream that breaks and a client that leaves fail alone, freeing their slot;
text-only requests (no image) decode beside the others.
The real `tritonserver` runs the same code in tests/serving/test_serving.py."""

import importlib
import io
import json
import sys
import threading
import types

import numpy as np
import pytest

from tgedge.data import shapes
from tgedge.export.onnx_export import export_model
from tgedge.runtime.pipeline import Pipeline

FINAL = 1
RAMBLE = {"max_new_tokens": 24, "temperature": 1000.0, "seed": 1}


class Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        self.tensors, self.error = {t.name: t for t in output_tensors}, error


class TritonError:
    def __init__(self, message):
        self.text = message

    def message(self):
        return self.text


class Logger:
    lines: list[str] = []

    @classmethod
    def log_info(cls, line):
        cls.lines.append(line)

    log_error = log_info


def _fake_pb_utils():
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.InferenceResponse, m.TritonError, m.Logger = Tensor, InferenceResponse, TritonError, Logger
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    m.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    return m


@pytest.fixture
def entry_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    monkeypatch.delitem(sys.modules, "tgedge.serving.entry", raising=False)
    Logger.lines = []
    yield importlib.import_module("tgedge.serving.entry")
    sys.modules.pop("tgedge.serving.entry", None)  # not left bound to the stand-in


class Sender:
    """A response sender: text pieces, then the final response (an answer or an error). `breaks_after`: sending
    the n-th text piece fails (the stream broke); `leaves_after`: the client has gone after n pieces."""

    def __init__(self, breaks_after=None, leaves_after=None):
        self.pieces, self.final, self.error = [], None, None
        self.breaks_after, self.leaves_after = breaks_after, leaves_after
        self.done = threading.Event()

    def send(self, response=None, flags=0):
        if response is not None and response.error is not None:
            self.error = response.error.message()
        elif response is not None and "answer" in response.tensors:
            self.final = json.loads(response.tensors["answer"].array[0].decode())
        elif response is not None:
            if self.breaks_after is not None and len(self.pieces) >= self.breaks_after:
                raise RuntimeError("stream closed")
            self.pieces.append(response.tensors["text"].array[0].decode())
        if flags & FINAL:
            self.done.set()

    def is_cancelled(self):
        return self.leaves_after is not None and len(self.pieces) >= self.leaves_after


class Request:
    def __init__(self, image: bytes | None, question: str, sender: Sender, **options):
        self.tensors = {"question": Tensor("question", np.array([question.encode()], np.object_))}
        if image is not None:  # none: a text-only request
            self.tensors["image"] = Tensor("image", np.frombuffer(image, np.uint8))
        for k, v in options.items():
            self.tensors[k] = Tensor(k, np.array([v]))
        self.sender = sender

    def get_response_sender(self):
        return self.sender

    def is_cancelled(self):
        return self.sender.is_cancelled()


@pytest.fixture(scope="module")
def demo_static(tmp_path_factory):
    return export_model("demo", tmp_path_factory.mktemp("entry") / "static", cache_mode="static",
                        check=False).directory


def _samples(n):
    """(image, question, its PNG bytes): PNG is lossless, so the server decodes the very pixels."""
    out = []
    for s in shapes.generate(shapes.SPLIT_SEEDS["eval"], n):
        buffer = io.BytesIO()
        s.image.save(buffer, format="PNG")
        out.append((s.image, s.prompt, buffer.getvalue()))
    return out


def _serve(entry, requests):
    for r in requests:
        entry.submit(r)
    for r in requests:
        assert r.sender.done.wait(120), "no final response"


def test_static_export_decodes_in_shared_steps_and_bad_requests_fail_alone(entry_module, demo_static):
    samples = _samples(6)
    samples[5] = (None, samples[5][1], None)  # a text-only request among them
    with Pipeline(demo_static) as p:
        ref = [p.answer(image, prompt, p.options(max_new_tokens=24)).to_dict() for image, prompt, _ in samples]
        assert ref[5]["prompt_tokens"] < ref[4]["prompt_tokens"] - 16  # no image positions
        context = p.context
    entry = entry_module.Entry(demo_static, {"max_inflight": "3", "bls_stages": ""})
    try:
        assert entry.scheduler is not None and entry.scheduler.decoder.slots == 3
        assert any("in-flight batching, one scheduler of 3 slots" in line for line in Logger.lines)
        steps = []
        decode = entry.scheduler.decoder.decode
        entry.scheduler.decoder.decode = lambda tokens: steps.append(len(tokens)) or decode(tokens)
        good = [Request(data, prompt, Sender(), max_new_tokens=24) for _, prompt, data in samples]
        bad = {"image": Request(b"not an image", samples[0][1], Sender()),
               "context": Request(samples[0][2], "why " * context, Sender()),
               # sampled at a high temperature the demo model rambles on: long answers, left mid-stream
               "broken": Request(samples[1][2], samples[1][1], Sender(breaks_after=2), **RAMBLE),
               "gone": Request(samples[2][2], samples[2][1], Sender(leaves_after=2), **RAMBLE)}
        requests = good[:2] + [bad["image"], bad["broken"]] + good[2:4] + [bad["context"], bad["gone"]] + good[4:]
        _serve(entry, requests)
        for r, want in zip(good, ref):
            assert r.sender.error is None, r.sender.error
            got = r.sender.final
            assert (got["tokens"], got["text"], got["prompt_tokens"]) == (want["tokens"], want["text"],
                                                                          want["prompt_tokens"])
            assert "".join(r.sender.pieces).strip() == got["text"]
            assert set(got["timings"]) >= set(want["timings"]) | {"server_s", "queued_s"}
        assert max(steps) > 1  # requests shared decoder steps
        assert "unreadable image" in bad["image"].sender.error
        assert "longer than the context" in bad["context"].sender.error
        assert "stream closed" in bad["broken"].sender.error and bad["broken"].sender.final is None
        assert bad["broken"].sender.pieces and len(bad["gone"].sender.pieces) == 2
        assert bad["gone"].sender.error is None and bad["gone"].sender.final is None  # nobody to tell
        assert any("request cancelled" in line for line in Logger.lines)
        assert entry.scheduler.decoder.free == 3 and entry.scheduler.pending == 0
    finally:
        entry.close()


def test_growing_export_and_one_slot_decode_per_request(entry_module, demo_export, demo_static):
    sample = _samples(1)[0]
    for directory, inflight, why in ((demo_export.directory, "4", "needs a static KV cache"),
                                     (demo_static, "1", "max_inflight is 1")):
        with Pipeline(directory) as p:
            want = p.answer(sample[0], sample[1], p.options(max_new_tokens=16)).tokens
        Logger.lines = []
        entry = entry_module.Entry(directory, {"max_inflight": inflight, "bls_stages": ""})
        try:
            assert entry.scheduler is None
            assert any("each request decodes on its own" in line and why in line for line in Logger.lines)
            requests = [Request(sample[2], sample[1], Sender(), max_new_tokens=16) for _ in range(2)]
            _serve(entry, requests)
            assert [r.sender.final["tokens"] for r in requests] == [want, want]
        finally:
            entry.close()


def _turn(entry, image, question, **options):
    request = Request(image, question, Sender(), max_new_tokens=8, **options)
    _serve(entry, [request])
    return request.sender


@pytest.mark.parametrize("cache", ["growing", "static"])
def test_conversations_reuse_the_kv_cache_and_recompute_after_eviction(entry_module, demo_export, demo_static, cache):
    """Turns of served conversations answer as the Conversation API does on a pipeline of their own; with room for one
    KV cache, interleaved conversations let each other's go and say so (the tokens unchanged); a forgotten
    conversation starts anew; conflicting turns are per-request errors."""
    from tgedge.conversation import Conversation

    directory = demo_export.directory if cache == "growing" else demo_static
    (image, question, data), (image2, question2, data2) = _samples(2)
    follow = ["how many shapes are there?", "is there a red square?"]
    with Pipeline(directory) as p:
        want = {}
        for key, img, first in (("a", image, question), ("b", image2, question2)):
            conv = Conversation(p, [img])
            want[key] = [conv.ask(q, p.options(max_new_tokens=8)).tokens for q in [first, *follow]]
            conv.close()
    entry = entry_module.Entry(directory, {"max_inflight": "2", "bls_stages": "", "conversations": "1"})
    try:
        entry.conversations.max_kept = 2
        got = _turn(entry, data, question, conversation="a").final
        assert (got["tokens"], got["turn"], got["reused_tokens"], got["recomputed"]) == (want["a"][0], 1, 0, False)
        got = _turn(entry, None, follow[0], conversation="a").final  # a follow-up: no image sent
        assert (got["tokens"], got["turn"], got["recomputed"]) == (want["a"][1], 2, False) and got["reused_tokens"] > 0
        assert _turn(entry, data2, question2, conversation="b").final["tokens"] == want["b"][0]  # a's cache let go
        got = _turn(entry, data, follow[1], conversation="a").final  # the same image sent again: fine
        assert (got["tokens"], got["turn"], got["reused_tokens"], got["recomputed"]) == (want["a"][2], 3, 0, True)
        got = _turn(entry, None, follow[0], conversation="b").final
        assert (got["tokens"], got["turn"], got["recomputed"]) == (want["b"][1], 2, True)
        assert entry.conversations.evicted == 3  # b let a go, a let b go, b let a go
        assert "about other images" in _turn(entry, data2, follow[0], conversation="a").error
        assert "cannot switch to 'first'" in _turn(entry, None, follow[0], conversation="a",
                                                   conversation_guide="first").error
        assert "choose from latest, first" in _turn(entry, None, "q", conversation="a", conversation_guide="x").error
        assert "no raw, no guide" in _turn(entry, data, "q", conversation="a", guide="q").error
        assert "1 to 256 printable characters" in _turn(entry, None, "q", conversation="\n").error
        assert _turn(entry, data, question, conversation="c").final["turn"] == 1  # max_kept 2: a is forgotten
        assert entry.conversations.forgotten == 1 and list(entry.conversations.records) == ["b", "c"]
        got = _turn(entry, data, question, conversation="a").final
        assert (got["turn"], got["tokens"]) == (1, want["a"][0])  # anew
    finally:
        entry.close()


def test_several_images_in_one_request(entry_module, demo_export):
    (image, question, data), (image2, _, data2) = _samples(2)
    with Pipeline(demo_export.directory) as p:
        want = p.answer([image, image2], question, p.options(max_new_tokens=8)).tokens
    entry = entry_module.Entry(demo_export.directory, {"max_inflight": "2", "bls_stages": ""})
    try:
        request = Request(None, question, Sender(), max_new_tokens=8)
        request.tensors["images"] = Tensor("images", np.array([data, data2], np.object_))
        _serve(entry, [request])
        assert request.sender.final["tokens"] == want
        both = Request(data, question, Sender())
        both.tensors["images"] = Tensor("images", np.array([data2], np.object_))
        _serve(entry, [both])
        assert "inputs 'image' and 'images' both given" in both.sender.error
    finally:
        entry.close()
