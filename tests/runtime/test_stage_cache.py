"""The stage cache: question-independent outputs kept per image, never a stale hit, within its byte bound."""

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tgedge
import tgedge.demo
import tiny
from tgedge.errors import TgedgeError
from tgedge.prompt import PromptTemplate
from tgedge.reference import TorchPipeline
from tgedge.runtime.pipeline import Pipeline
from tgedge.stagecache import StageCache

QUESTIONS = ["what color is the circle?", "how many shapes are there?", "is there a square?"]


def counting_stage():
    calls = []

    def run_stage(stage, feed):
        calls.append(stage)
        return {"out": np.full((4, 8), float(feed["x"].sum()), np.float32)}  # 128 bytes

    return run_stage, calls


def test_bound_holds_and_least_recently_used_goes_first():
    run_stage, calls = counting_stage()
    cache = StageCache(max_bytes=2 * 128)
    feeds = [{"x": np.full(3, i, np.float32)} for i in range(3)]
    for f in feeds[:2]:
        cache.run(run_stage, "m", "vision", f)
    cache.run(run_stage, "m", "vision", feeds[0])  # a hit: feed 0 becomes the most recently used
    assert calls == ["vision", "vision"] and cache.last_hit["vision"]
    cache.run(run_stage, "m", "vision", feeds[2])  # evicts feed 1, the least recently used
    assert len(cache) == 2 and cache.bytes == 256 <= cache.max_bytes
    assert cache.stats["vision"].evictions == 1
    cache.run(run_stage, "m", "vision", feeds[0])
    assert len(calls) == 3 and cache.last_hit["vision"]
    cache.run(run_stage, "m", "vision", feeds[1])
    assert len(calls) == 4 and not cache.last_hit["vision"] and cache.bytes <= cache.max_bytes


def test_an_output_over_the_bound_is_returned_not_kept():
    run_stage, calls = counting_stage()
    cache = StageCache(max_bytes=100)
    out = cache.run(run_stage, "m", "vision", {"x": np.ones(2, np.float32)})
    assert out["out"].shape == (4, 8) and len(cache) == 0 and cache.bytes == 0


def test_identity_dtype_and_shape_are_part_of_the_key():
    run_stage, calls = counting_stage()
    cache = StageCache(max_bytes=1 << 20)
    x = np.zeros(4, np.float32)
    for identity, feed in [("a", x), ("b", x), ("a", x.astype(np.float64)), ("a", x.reshape(2, 2)), ("a", x)]:
        cache.run(run_stage, identity, "vision", {"x": feed})
    assert len(calls) == 4 and cache.stats["vision"].hits == 1


def test_a_hit_is_a_copy():
    run_stage, _ = counting_stage()
    cache = StageCache(max_bytes=1 << 20)
    feed = {"x": np.ones(2, np.float32)}
    cache.run(run_stage, "m", "vision", feed)["out"][:] = -1
    cache.run(run_stage, "m", "vision", feed)["out"][:] = -1
    assert (cache.run(run_stage, "m", "vision", feed)["out"] == 2).all()


@pytest.mark.parametrize("bound", [-1, 1.5, True])
def test_bad_bound(bound):
    with pytest.raises(TgedgeError, match="whole number of bytes"):
        StageCache(bound)


def _contracts(tmp_path):
    hf = tmp_path / "hf"
    tiny.hf_llava(hf)
    gated = Path(tgedge.__file__).parent / "demo_model_gated"
    return {p: TorchPipeline.from_checkpoint(p).contract for p in ("demo", gated, hf)}


def test_families_declare_only_stages_the_question_does_not_reach(tmp_path):
    """A declared stage takes no text guide output (nor its ids): else a cached output would answer another question."""
    contracts = _contracts(tmp_path)
    assert sorted(c.family for c in contracts.values()) == ["gated", "plain", "tg"]
    for c in contracts.values():
        question = set(c.stages["text_guide"].output_names) if c.has("text_guide") else set()
        reached = set()
        for stage in c.stage_names:  # in pipeline order: a stage fed by a question-dependent one depends on it too
            inputs = set(c.stages[stage].input_names)
            if stage == "text_guide" or inputs & (question | reached):
                reached |= set(c.stages[stage].output_names) | {stage}
        declared = set(c.fusion_family.question_independent)
        assert declared and not declared & reached and declared <= set(c.stage_names) - {"embed", "decoder"}, c.family
    assert {c.family: c.fusion_family.question_independent for c in contracts.values()} == {
        "tg": ("vision",), "gated": ("vision",), "plain": ("vision", "fusion")}


def _answers(pipe, image, questions, n=6):
    return [pipe.answer(image, q, pipe.options(max_new_tokens=n)).tokens for q in questions]


def test_demo_export_hits_answer_like_a_fresh_run(demo_export, tmp_path):
    image = tgedge.demo.shapes_image(tmp_path / "a.png")
    with Pipeline(demo_export.directory) as fresh:
        expected = _answers(fresh, image, QUESTIONS)
    cache = StageCache(64 << 20)
    with Pipeline(demo_export.directory) as pipe:
        pipe.use_stage_cache(cache)
        assert _answers(pipe, image, QUESTIONS) == expected
        assert cache.stats["vision"].to_dict() == {"hits": 2, "misses": 1, "evictions": 0}
        assert set(cache.stats) == {"vision"}  # TG: fusion depends on the question, never kept
        # the same picture under another name is a hit; one changed pixel is a miss
        shutil.copy(image, tmp_path / "b.png")
        pipe.answer(tmp_path / "b.png", QUESTIONS[0], pipe.options(max_new_tokens=2))
        assert cache.last_hit["vision"]
        pixels = np.asarray(Image.open(image)).copy()
        pixels[40, 20] = 255 - pixels[40, 20]
        Image.fromarray(pixels).save(tmp_path / "c.png")
        changed = pipe.answer(tmp_path / "c.png", QUESTIONS[0], pipe.options(max_new_tokens=6)).tokens
        assert not cache.last_hit["vision"] and cache.stats["vision"].misses == 2
        with Pipeline(demo_export.directory) as fresh:
            assert changed == _answers(fresh, tmp_path / "c.png", QUESTIONS[:1])[0]
        # another preprocessing setting (the same pixels: only the template differs) is a miss
        pipe.pre = pipe.pre.replace(template=PromptTemplate("vicuna_v1"))
        pipe.answer(image, QUESTIONS[0], pipe.options(max_new_tokens=2))
        assert not cache.last_hit["vision"]
        pipe.pre = pipe.pre.replace(image=replace(pipe.pre.spec.image, mean=(0.5, 0.5, 0.5)))
        pipe.answer(image, QUESTIONS[0], pipe.options(max_new_tokens=2))
        assert not cache.last_hit["vision"]
    # another export (the same graphs elsewhere) sharing the cache is a miss, then its own hit
    shutil.copytree(demo_export.directory, tmp_path / "copy")
    with Pipeline(tmp_path / "copy") as other:
        other.use_stage_cache(cache)
        assert _answers(other, image, QUESTIONS[:2]) == expected[:2]
        assert cache.stats["vision"].misses == 5 and cache.last_hit["vision"]


def test_plain_llava_keeps_the_image_embeddings(tmp_path):
    from tgedge.export.onnx_export import export_model

    tiny.hf_llava(tmp_path / "ckpt")
    export_model(tmp_path / "ckpt", tmp_path / "out")
    image = tiny.test_image(tmp_path / "i.png")
    questions = ["what color is the circle?", "how many are there?"]
    with Pipeline(tmp_path / "out") as fresh:
        expected = _answers(fresh, image, questions, 8)
    cache = StageCache(8 << 20)
    with Pipeline(tmp_path / "out") as pipe:
        assert _answers(pipe.use_stage_cache(cache), image, questions, 8) == expected
    assert {s: st.hits for s, st in cache.stats.items()} == {"vision": 1, "fusion": 1}


def test_the_reference_keeps_vision_too(tmp_path):
    image = tgedge.demo.shapes_image(tmp_path / "a.png")
    fresh = TorchPipeline.from_checkpoint("demo")
    expected = _answers(fresh, image, QUESTIONS[:2])
    cache = StageCache(64 << 20)
    pipe = TorchPipeline.from_checkpoint("demo").use_stage_cache(cache)
    assert _answers(pipe, image, QUESTIONS[:2]) == expected and cache.stats["vision"].hits == 1
    pipe.ablate("dp")  # another model now: no output of before is taken
    pipe.answer(image, QUESTIONS[0], pipe.options(max_new_tokens=2))
    assert not cache.last_hit["vision"]
