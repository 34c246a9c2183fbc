"""The static KV cache (one buffer per layer, bound once as past and present) decodes as the growing cache does, in
both its forms (`static`: GroupQueryAttention; `static-onnx`: opset-24 TensorScatter + Attention): the same greedy
tokens and logits within fp32 noise, on the demo, a tiny LLaMA, a tiny Qwen2 and the tg-tiny preset; nothing of the
cache is allocated or copied per step."""

import json
import re

import numpy as np
import pytest

import tiny
from tgedge.cli import main
from tgedge.errors import TgedgeError
from tgedge.export.onnx_export import export_model
from tgedge.generate import forced_logits
from tgedge.runtime.cache import StaticCache
from tgedge.runtime.manifest import Manifest
from tgedge.runtime.pipeline import Pipeline

NEW_TOKENS = 12
LOGITS_ATOL = 1e-4


def _samples(tmp_path, n=2):
    images = [tiny.test_image(tmp_path / f"{i}.png", size=(40 + 9 * i, 30 + 5 * i), seed=i) for i in range(n)]
    return list(zip(images, ["what color is the circle?", "how many are there?"][:n]))


def assert_static_decodes_as_growing(growing_dir, static_dir, samples) -> float:
    """Greedy tokens identical (EOS off: every run NEW_TOKENS long) and teacher-forced logits within LOGITS_ATOL."""
    worst = 0.0
    with Pipeline(growing_dir) as g, Pipeline(static_dir) as s:
        assert isinstance(s.cache, StaticCache)
        for image, prompt in samples:
            a = g.answer(image, prompt, g.options(max_new_tokens=NEW_TOKENS, eos_token_ids=[], stop_strings=[]))
            b = s.answer(image, prompt, s.options(max_new_tokens=NEW_TOKENS, eos_token_ids=[], stop_strings=[]))
            assert a.tokens == b.tokens and len(a.tokens) == NEW_TOKENS, (prompt, a.tokens, b.tokens)
            x = g.embeddings(g.pre(image, prompt))
            worst = max(worst, float(np.abs(forced_logits(g, x, a.tokens) - forced_logits(s, x, a.tokens)).max()))
    assert worst <= LOGITS_ATOL, worst
    return worst


STATIC_MODES = ["static", "static-onnx"]


@pytest.fixture(params=STATIC_MODES)
def demo_static(request, demo_static_exports):
    return demo_static_exports(request.param)


def test_manifest_states_the_static_mode(demo_static):
    m = json.loads((demo_static.directory / "manifest.json").read_text())
    kv = m["kv_cache"]
    assert kv["mode"] in STATIC_MODES and kv["past_present_share_buffer"] is True
    assert kv["max_length"] == m["max_context"]
    dec = m["graphs"]["decoder"]
    assert [i["name"] for i in dec["inputs"]][:2] == ["inputs_embeds", "attention_mask"]  # positions = the slots
    past = next(i for i in dec["inputs"] if i["name"] == "past_key_values.0.key")
    assert past["shape"] == ["batch_size", kv["num_kv_heads"], m["max_context"], kv["head_dim"]]
    present = next(o for o in dec["outputs"] if o["name"] == "present.0.key")
    assert present["shape"] == past["shape"]
    import onnx

    graph = onnx.load(str(demo_static.directory / "decoder.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    opset = {o.domain: o.version for o in graph.opset_import}
    count = lambda op: sum(n.op_type == op for n in graph.graph.node)  # noqa: E731
    layers = kv["num_layers"]
    if kv["mode"] == "static":
        assert "GroupQueryAttention" in ops and "Concat" not in ops and opset[""] == 17
        # residual Add + RMSNorm fused (onnxruntime's kernel) for every norm after the first, whose stream is the
        # embeddings themselves: 2 per layer less one, plus the final norm; no residual Add left
        assert count("SkipSimplifiedLayerNormalization") == 2 * layers and count("Pow") == 1
        assert not [n.name for n in graph.graph.node if re.fullmatch(r"/layers\.\d+/Add(_\d+)?", n.name)]
        fused = next(n for n in graph.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
        assert fused.domain == "com.microsoft" and fused.output[1:3] == ["", ""]  # mean / inv std not computed
        final = [n for n in graph.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"][-1]
        assert final.output[3] == ""  # the stream ends at the final norm: no sum
    else:  # standard ops only; the presents are TensorScatter's outputs, and nothing concatenates the cache
        assert {"TensorScatter", "Attention"} <= ops and "GroupQueryAttention" not in ops
        assert set(opset) == {""} and opset[""] == 24
        writers = {n.output[0]: n.op_type for n in graph.graph.node}
        assert all(writers[o["name"]] == "TensorScatter" for o in dec["outputs"] if o["name"].startswith("present."))
        pasts = {i["name"] for i in dec["inputs"] if i["name"].startswith("past_key_values.")}
        assert all(n.op_type == "TensorScatter" for n in graph.graph.node if pasts & set(n.input))


def test_a_fixed_size_mask_decodes_alike(demo_static):
    """GroupQueryAttention takes the filled length from the mask's sum (`seqlens_k`), so a decode step fed a mask of
    the whole buffer, zeros past the filled positions (the fixed shape a CUDA graph needs), gives the same logits."""
    if demo_static.manifest.contract.cache.mode != "static":
        pytest.skip("static-onnx takes the positions from the mask's length")
    from tgedge.bench.genai_worker import ids_for

    with Pipeline(demo_static.directory) as p:
        x = p.embed_tokens(ids_for(20, p.manifest.model["decoder"]["vocab_size"])[None])

        def decode(fixed: bool) -> np.ndarray:
            p.setup_cache(40)
            logits, out = [], p.prefill(x)
            for _ in range(8):
                e = p.embed_tokens(np.array([[int(np.argmax(out))]], np.int64))
                feed = {"inputs_embeds": e, **p.cache.feed(1)}
                if fixed:
                    feed["attention_mask"] = np.zeros((1, p.cache.layout.max_length), np.int64)
                    feed["attention_mask"][0, :p.cache.length + 1] = 1
                result = p.run_stage("decoder", feed, **p.cache.options)
                p.cache.update(result, 1)
                out = result["logits"][0, -1]
                logits.append(out)
            p.clear_cache()
            return np.array(logits)

        growing, fixed = decode(False), decode(True)
    assert np.std(growing) > 0
    np.testing.assert_allclose(fixed, growing, rtol=0, atol=1e-5)


def test_demo_static_decodes_as_growing(demo_export, demo_static, tmp_path):
    from tgedge.data import shapes

    samples = [(s.image, s.prompt) for s in shapes.generate(shapes.SPLIT_SEEDS["eval"], 3)]
    assert_static_decodes_as_growing(demo_export.directory, demo_static.directory, samples)


def test_buffers_are_bound_once_and_written_in_place(demo_export, demo_static):
    """The same buffer objects (same device memory) every step, holding what the growing cache's present holds."""
    from tgedge.data import shapes

    sample = next(iter(shapes.generate(shapes.SPLIT_SEEDS["eval"], 1)))
    with Pipeline(demo_export.directory) as g, Pipeline(demo_static.directory) as s:
        x = g.embeddings(g.pre(sample.image, sample.prompt))
        t = x.shape[1]
        g.setup_cache(t + 3)
        s.setup_cache(t + 3)
        buffers = dict(s.cache.buffers)
        pointers = {n: v.data_ptr() for n, v in buffers.items()}
        token = int(np.argmax(g.prefill(x)))
        s.prefill(x)
        for i in range(2):
            g.decode_one_token(token, t + i)
            s.decode_one_token(token, t + i)
        assert s.cache.buffers == buffers and all(v.data_ptr() == pointers[n] for n, v in s.cache.buffers.items())
        assert s.cache.options["bound"].inputs == buffers
        for past in g.cache.layout.past_names():
            grown = g.cache.feed(1)[past].numpy()  # (1, Hkv, t + 2, D)
            np.testing.assert_allclose(s.cache.buffers[past].numpy()[:, :, :t + 2], grown, atol=1e-5)
        s.decode_one_token(token, t + 2)
        with pytest.raises(TgedgeError, match=rf"{t + 4} positions exceed the cache \({t + 3}\)"):
            s.decode_one_token(token, t + 3)
        g.clear_cache()
        s.clear_cache()
        with pytest.raises(TgedgeError, match="exceed the static cache"):
            s.cache.reset(s.cache.layout.max_length + 1, s.runners["decoder"])


def test_a_runner_that_cannot_bind_gets_host_buffers(demo_export, demo_static):
    """A wrapping runner (calibration's recorder, a remote stage) has no buffer/bind: the present comes back and is
    the next past, and the answers do not change."""
    from tgedge.data import shapes
    from tgedge.runtime.backends import make_runner

    class Wrapped:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name in ("buffer", "bind"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    samples = [(s.image, s.prompt) for s in shapes.generate(shapes.SPLIT_SEEDS["eval"], 1)]
    with Pipeline(demo_static.directory, runner_factory=lambda m, g: Wrapped(make_runner("onnxruntime", m, g))) as w, \
            Pipeline(demo_static.directory) as s:
        for image, prompt in samples:
            opts = dict(max_new_tokens=NEW_TOKENS, eos_token_ids=[], stop_strings=[])
            assert w.answer(image, prompt, w.options(**opts)).tokens == s.answer(image, prompt, s.options(**opts)).tokens
        assert w.cache.bound is None and w.cache.keep == tuple(w.cache.layout.present_names())
        assert s.cache.bound is not None and s.cache.keep == ()


def test_onnxruntime_writes_the_bound_buffers_in_place(demo_static_exports, capfd):
    """static-onnx: onnxruntime's TensorScatter says when it has to copy the past into a present of its own; bound as
    both (the pipeline), it never does; fed unbound (a runner that cannot bind), it does."""
    import onnxruntime as ort

    from tgedge.data import shapes
    from tgedge.runtime import onnxrt

    def loud(self):  # the shipped sessions log errors only; the copy is a warning
        so = ort.SessionOptions()
        so.log_severity_level = 1
        return ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])

    static = demo_static_exports("static-onnx")
    sample = next(iter(shapes.generate(shapes.SPLIT_SEEDS["eval"], 1)))
    copied = "in-place optimization not activated"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnxrt.SessionFromOnnx, "__call__", loud)
        with Pipeline(static.directory) as s:
            s.answer(sample.image, sample.prompt, s.options(max_new_tokens=4))
            assert s.cache.bound is not None
        assert copied not in capfd.readouterr().err
        with Pipeline(static.directory) as s:
            s.setup_cache(8)
            s.cache.bound = None  # as a runner without bind() leaves it: the buffers fed, not bound
            s.prefill(np.zeros((1, 3, static.manifest.model["decoder"]["hidden_size"]), np.float32))
        assert copied in capfd.readouterr().err


@pytest.fixture(scope="module")
def growing(request, tmp_path_factory):
    """`growing(name)`: a tiny checkpoint and its growing-cache export, each built on first use and shared read-only
    by the tests (and parametrised cases) that export it again with a static cache."""
    made = {}

    def get(name: str):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            ckpt, kw = root / "ckpt", {}
            if name.startswith("tg-tiny"):  # the session's tg-tiny preset; "tg-tiny-int4w": with an int4w decoder
                ckpt = request.getfixturevalue("tg_tiny")
                kw = dict(clip=ckpt / "clip", decoder_weights="int4w" if name.endswith("int4w") else None)
            elif name.endswith("64"):  # GroupQueryAttention's RoPE wants a head size of 16k: 64 wide, 4 heads
                base = tiny.decoder_config_dict
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(tiny, "decoder_config_dict", lambda f, v: {**base(f, v), "hidden_size": 64})
                    tiny.hf_llava(ckpt, name.removesuffix("64"))
            else:  # 48 wide, 4 heads: 12
                tiny.hf_llava(ckpt, name)
            export_model(ckpt, root / "growing", check=False, **kw)
            made[name] = ckpt, root / "growing", kw
        return made[name]
    return get


@pytest.mark.parametrize("family,mode", [("llama", "static"), ("qwen2", "static"), ("qwen2", "static-onnx")])
def test_tiny_llava_static_decodes_as_growing(family, mode, growing, tmp_path):
    ckpt, growing_dir, _ = growing(f"{family}64")
    assert export_model(ckpt, tmp_path / "static", cache_mode=mode).passed
    assert_static_decodes_as_growing(growing_dir, tmp_path / "static", _samples(tmp_path))


def test_static_onnx_takes_any_head_size(growing, tmp_path):
    """The standard-op form has no kernel constraint: the 12-wide heads GroupQueryAttention refuses."""
    ckpt, growing_dir, _ = growing("llama")  # 48 wide, 4 heads: 12
    assert export_model(ckpt, tmp_path / "static", cache_mode="static-onnx").passed
    assert_static_decodes_as_growing(growing_dir, tmp_path / "static", _samples(tmp_path, 1))


@pytest.mark.parametrize("mode", STATIC_MODES)
@pytest.mark.parametrize("weights", ["fp32", "int4w"])
def test_tg_tiny_preset_static_int4w(mode, weights, growing, tmp_path):
    """The original-layout TG preset (Qwen2: qkv bias, tied table), fp32 and int4w, static vs growing."""
    ckpt, growing_dir, kw = growing("tg-tiny" if weights == "fp32" else "tg-tiny-int4w")
    assert export_model(ckpt, tmp_path / "static", cache_mode=mode, **kw).passed
    assert_static_decodes_as_growing(growing_dir, tmp_path / "static", _samples(tmp_path, 1))


def test_static_needs_a_head_size_of_16k(growing, tmp_path, capsys):
    ckpt, _, _ = growing("llama")  # 48 wide, 4 heads: 12
    with pytest.raises(TgedgeError, match="multiple of 16; this decoder's is 12: export with --cache static-onnx"):
        export_model(ckpt, tmp_path / "out", cache_mode="static")
    assert not (tmp_path / "out").exists()
    # the default target (onnxruntime) takes the static cache in standard ops there, and says so
    said = []
    export_model(ckpt, tmp_path / "auto", target="onnxruntime", check=False, on_step=said.append)
    assert Manifest.load(tmp_path / "auto").contract.cache.mode == "static-onnx"
    assert any("the static-onnx cache instead" in s for s in said)


def test_export_target_picks_the_cache(tmp_path, capsys):
    """tgedge export's default target, onnxruntime, writes the static cache (the fast decode, batched by tgedge
    serve); tensorrt static-onnx; jetpack6 growing (opset 17: TensorRT 10.3); --target with --cache is one line."""
    for extra, mode in (([], "static"), (["--target", "tensorrt"], "static-onnx"), (["--target", "jetpack6"], "growing")):
        out = tmp_path / (extra[-1] if extra else "default")
        assert main(["export", "demo", "-o", str(out), "--no-check", "--json", *extra]) == 0
        capsys.readouterr()
        assert Manifest.load(out).contract.cache.mode == mode
    assert main(["export", "demo", "-o", str(tmp_path / "x"), "--target", "jetpack6", "--cache", "static"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "give one of them" in err and not (tmp_path / "x").exists()


def test_bad_cache_option_is_one_line(tmp_path, capsys):
    assert main(["export", "demo", "-o", str(tmp_path / "x"), "--cache", "paged"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cache" in err and "static" in err
    assert main(["export", "demo", "-o", str(tmp_path / "x"), "--block-size", "48"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("mode", STATIC_MODES)
def test_fp16_static_cache(mode, demo_export, demo_static_exports):
    """fp16 buffers (kv_cache.dtype float16): the export's check against torch, and greedy decoding as the fp32
    growing export's (logits within fp16 rounding)."""
    from tgedge.data import shapes

    static = demo_static_exports(mode, "fp16")  # checked against torch: asserts passed
    assert static.passed and static.manifest.contract.cache.dtype == "float16"
    samples = [(s.image, s.prompt) for s in shapes.generate(shapes.SPLIT_SEEDS["eval"], 2)]
    global LOGITS_ATOL
    atol, LOGITS_ATOL = LOGITS_ATOL, 0.1  # fp16 weights and cache against fp32
    try:
        assert_static_decodes_as_growing(demo_export.directory, static.directory, samples)
    finally:
        LOGITS_ATOL = atol


def test_static_onnx_int8_decoder_is_refused_and_mixed_precision_runs(demo_static_exports, tmp_path, capsys):
    """onnxruntime's int8 quantiser cannot write an opset-24 decoder that onnxruntime loads: one line, exit 2, nothing
    written; the vision side int8 beside an int4w decoder works."""
    from tgedge.data import shapes
    from tgedge.data.folder import write_folder

    static = demo_static_exports("static-onnx")
    calib = write_folder(shapes.generate(shapes.SPLIT_SEEDS["calibration"], 8), tmp_path / "calib")
    out = tmp_path / "int8"
    assert main(["quantize", str(static.directory), "-o", str(out), "--precision", "int8", "--calib", str(calib)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "static-onnx" in err and "decoder=int4w" in err and not out.exists()
    assert main(["quantize", str(static.directory), "-o", str(out), "--precision",
                 "vision=int8,fusion=int8,decoder=int4w", "--calib", str(calib)]) == 0
    sample = next(iter(shapes.generate(shapes.SPLIT_SEEDS["eval"], 1)))
    with Pipeline(out) as p:
        assert p.answer(sample.image, sample.prompt, p.options(max_new_tokens=4)).tokens
        assert isinstance(p.cache, StaticCache) and p.cache.bound is not None
