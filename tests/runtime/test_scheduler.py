"""In-flight batching (runtime/batched.py, runtime/scheduler.py): every request's tokens through the scheduler are a
batch-1 answer's, with requests of different prompt lengths joining mid-flight and slots reused; bad requests fail
alone, with one line, and free their slot."""

import json

import pytest

import tiny
from tgedge.errors import TgedgeError
from tgedge.export.onnx_export import export_model
from tgedge.runtime.pipeline import Pipeline

STATIC_MODES = ["static", "static-onnx"]


def _opts(pipe, n, **kw):
    return pipe.options(max_new_tokens=n, eos_token_ids=[], stop_strings=[], **kw)  # EOS off: lengths by n


def _requests(samples):
    """(image, question, new tokens): questions of different lengths, different answer lengths."""
    out = []
    for k, (image, question) in enumerate(samples):
        out.append((image, " ".join([question] * (1 + k % 3)), 4 + 3 * k))
    return out


def assert_scheduled_as_batch1(directory, samples, slots=3, runner_factory=None, **opts):
    """Submit half, step a few times, submit the rest, step to the end: tokens equal, slots reused."""
    with Pipeline(directory, runner_factory=runner_factory) as p:
        requests = _requests(samples)
        ref = [p.answer(i, q, _opts(p, n, **opts)).tokens for i, q, n in requests]
        with p.scheduler(slots=slots, thread=False) as s:
            half = len(requests) // 2
            handles = [s.submit(i, q, _opts(p, n, **opts)) for i, q, n in requests[:half]]
            for _ in range(3):
                s.step()
            handles += [s.submit(i, q, _opts(p, n, **opts)) for i, q, n in requests[half:]]
            while s.step():
                pass
            assert s.decoder.free == slots
        assert len({h.prompt_tokens for h in handles}) > 1
        assert len({h.slot for h in handles}) < len(handles)  # a freed slot served a later request
        for h, r in zip(handles, ref):
            assert h.result().tokens == r, (h.id, h.result().tokens, r)


@pytest.fixture(scope="module", params=STATIC_MODES)
def demo_static(request, tmp_path_factory):
    return export_model("demo", tmp_path_factory.mktemp("sched") / request.param, cache_mode=request.param,
                        check=False).directory


def _demo_samples(n):
    from tgedge.data import shapes

    return [(s.image, s.prompt) for s in shapes.generate(shapes.SPLIT_SEEDS["eval"], n)]


def test_demo_scheduled_tokens_are_batch1s(demo_static):
    assert_scheduled_as_batch1(demo_static, _demo_samples(7))


def test_sampled_requests_keep_their_own_seed(demo_static):
    samples = _demo_samples(3)
    with Pipeline(demo_static) as p:
        opts = [_opts(p, 10, temperature=1.5, top_k=20, seed=k) for k in range(3)]
        ref = [p.answer(i, q, o).tokens for (i, q), o in zip(samples, opts)]
        assert len({tuple(r) for r in ref}) > 1
        with p.scheduler(slots=2, thread=False) as s:
            handles = [s.submit(i, q, o) for (i, q), o in zip(samples, opts)]
            while s.step():
                pass
        assert [h.result().tokens for h in handles] == ref


def test_the_thread_streams_and_answers(demo_static):
    """The default: one thread steps; tokens() streams what result() returns, on_token sees each; defaults (EOS on)
    give batch-1's answer text."""
    samples = _demo_samples(5)
    with Pipeline(demo_static) as p:
        ref = [p.answer(i, q) for i, q in samples]
        seen = []
        with p.scheduler(slots=2, max_waiting=8) as s:
            handles = [s.submit(i, q, on_token=seen.append if k == 0 else None) for k, (i, q) in enumerate(samples)]
            streamed = list(handles[0].tokens(timeout=60))
            answers = [h.result(timeout=60) for h in handles]
        assert streamed == seen == answers[0].tokens
        assert [(a.text, a.tokens) for a in answers] == [(r.text, r.tokens) for r in ref]


def test_bad_requests_fail_alone(demo_static):
    """Beyond the context and a full queue: refused at submit; cancelled mid-stream and a failing stage: that
    request's one-line error; the others' tokens unchanged and every slot freed."""
    samples = _demo_samples(4)
    with Pipeline(demo_static, context=100) as p:
        ref = [p.answer(i, q, _opts(p, 6)).tokens for i, q in samples]
        with p.scheduler(slots=2, max_waiting=3, thread=False) as s:
            with pytest.raises(TgedgeError, match=r"prompt is \d+ tokens .* longer than the context \(100\)"):
                s.submit(samples[0][0], " ".join([samples[0][1]] * 4), _opts(p, 6))
            handles = [s.submit(i, q, _opts(p, 6)) for i, q in samples[:3]]
            with pytest.raises(TgedgeError, match=r"^request refused: 3 requests already wait .*max_waiting=3"):
                s.submit(*samples[3], _opts(p, 6))
            s.step()
            s.step()
            handles[1].cancel()
            fusion = p.runners["fusion"]
            failing = handles[2]

            class Failing:  # the fusion stage fails for the third request's inputs only
                def __getattr__(self, name):
                    return getattr(fusion, name)

                def infer(self, feed, **kw):
                    raise TgedgeError("fusion input 'image_features' | got nonsense")

            p.runners["fusion"] = Failing()
            s.step()  # the third is admitted now: its fusion fails
            p.runners["fusion"] = fusion
            late = s.submit(*samples[3], _opts(p, 6))
            while s.step():
                pass
            assert s.decoder.free == 2 and s.pending == 0
        assert handles[0].result().tokens == ref[0] and late.result().tokens == ref[3]
        streamed = []
        with pytest.raises(TgedgeError, match=r"^request 1: cancelled after 3 tokens$"):
            for token in handles[1].tokens():
                streamed.append(token)
        assert streamed == ref[1][:3]
        with pytest.raises(TgedgeError, match=r"^fusion input 'image_features' \| got nonsense$"):
            failing.result()
        assert failing.done and not failing.generated


def test_closing_fails_what_is_left(demo_static):
    with Pipeline(demo_static) as p:
        s = p.scheduler(slots=1, thread=False)
        a, b = (s.submit(i, q, _opts(p, 20)) for i, q in _demo_samples(2))
        s.step()
        s.close()
        for h in (a, b):
            with pytest.raises(TgedgeError, match=rf"^request {h.id}: the scheduler was closed$"):
                h.result(timeout=5)
        with pytest.raises(TgedgeError, match="scheduler is closed"):
            s.submit(*_demo_samples(1)[0])


def test_a_runner_that_cannot_bind_gets_host_buffers(demo_static):
    """A wrapping runner (calibration's recorder) has no buffer/bind: host buffers, each present copied back."""
    from tgedge.runtime.backends import make_runner

    class Wrapped:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name in ("buffer", "bind"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    wrapped = lambda m, g: Wrapped(make_runner("onnxruntime", m, g))  # noqa: E731
    with Pipeline(demo_static, runner_factory=wrapped) as p:
        assert not p.scheduler(slots=2, thread=False).decoder.shared
    with Pipeline(demo_static) as p:
        assert p.scheduler(slots=2, thread=False).decoder.shared
    assert_scheduled_as_batch1(demo_static, _demo_samples(4), slots=2, runner_factory=wrapped)

    class WholeBuffers(Wrapped):  # binds, but only whole buffers (TensorRT's runner): refused, not fed host arrays
        def __getattr__(self, name):
            return getattr(self.inner, name) if name != "binds_rows" else False

    whole = lambda m, g: WholeBuffers(make_runner("onnxruntime", m, g))  # noqa: E731
    with Pipeline(demo_static, runner_factory=whole) as p:
        from tgedge.runtime.batched import batching_problem

        assert "the WholeBuffers binds whole KV buffers, not a slot's rows" in batching_problem(p)
        with pytest.raises(TgedgeError, match="binds whole KV buffers"):
            p.scheduler(slots=2, thread=False)


def test_only_a_per_row_static_export_batches(demo_export, demo_static, tmp_path):
    with Pipeline(demo_export.directory) as p:
        with pytest.raises(TgedgeError, match="needs a static KV cache; this export's is 'growing'"):
            p.scheduler()
    # an export written before kv_cache.row_lengths: static-onnx then took one length for all rows
    import shutil

    old = tmp_path / "old"
    shutil.copytree(demo_static, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["kv_cache"]["row_lengths"]
    (old / "manifest.json").write_text(json.dumps(m))
    with Pipeline(old) as p:
        if m["kv_cache"]["mode"] == "static":  # GroupQueryAttention always took each row's length
            assert p.scheduler(slots=2, thread=False).decoder.slots == 2
        else:
            with pytest.raises(TgedgeError, match="takes one length for every row .* export the model again"):
                p.scheduler()
    with Pipeline(demo_static) as p:
        for bad in (0, "2"):
            with pytest.raises(TgedgeError, match="slots must be an integer >= 1"):
                p.scheduler(slots=bad)
        with pytest.raises(TgedgeError, match="max_waiting must be an integer >= 1"):
            p.scheduler(max_waiting=0)


@pytest.mark.parametrize("family,mode", [("llama", "static"), ("qwen2", "static"), ("llama", "static-onnx")])
def test_tiny_llava_scheduled_tokens_are_batch1s(family, mode, tmp_path, monkeypatch):
    if mode == "static":  # GroupQueryAttention's RoPE wants a head size of 16k: 64 wide, 4 heads
        base = tiny.decoder_config_dict
        monkeypatch.setattr(tiny, "decoder_config_dict", lambda f, v: {**base(f, v), "hidden_size": 64})
    tiny.hf_llava(tmp_path / "ckpt", family)
    export_model(tmp_path / "ckpt", tmp_path / "export", cache_mode=mode, check=False)
    images = [tiny.test_image(tmp_path / f"{i}.png", size=(40 + 9 * i, 30 + 5 * i), seed=i) for i in range(5)]
    questions = ["what color is the circle?", "how many are there?", "describe the image", "is it red?", "where?"]
    assert_scheduled_as_batch1(tmp_path / "export", list(zip(images, questions)))
