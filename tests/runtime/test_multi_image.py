"""Several images in one prompt on TG-LLaVA: each image through its own views, guided by the question, in order."""

import json

import numpy as np

import tiny
from tgedge.cli import main
from tgedge.reference import TorchPipeline
from tgedge.runtime.pipeline import Pipeline

QUESTION = "what color is the circle?"


def _images(tmp_path):
    from tgedge.demo import shapes_image

    return [shapes_image(tmp_path / "a.png"), tiny.test_image(tmp_path / "b.png", size=(60, 44), seed=3)]


def test_each_image_is_guided_by_the_question(tmp_path):
    pipe = TorchPipeline.from_checkpoint("demo")
    images = _images(tmp_path)
    both = pipe.pre(images, QUESTION)
    assert both.prompt.count("<image>") == 2 and both.crops.shape[:2] == (2, 4)
    alone = [pipe.pre(im, QUESTION) for im in images]
    expected = [pipe.encode_image(a.pixel_values, a.crops, a.guide_ids) for a in alone]
    np.testing.assert_array_equal(both.guide_ids, alone[0].guide_ids)  # the question alone, placeholders removed
    x = pipe.embeddings(both).numpy()
    at = both.input_ids[0] == pipe.pre.spec.image_token_id
    n = pipe.pre.spec.num_image_tokens
    assert at.sum() == 2 * n
    np.testing.assert_allclose(x[0, at], np.concatenate(expected).reshape(2 * n, -1), atol=1e-6)


def test_export_answers_two_images_like_the_reference(demo_export, tmp_path, capsys):
    images = [str(p) for p in _images(tmp_path)]
    argv = ["--image", images[0], "--image", images[1], "--prompt", QUESTION, "--json", "--max-new-tokens", "6"]
    assert main(["run", "demo", *argv]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(["run", str(demo_export.directory), *argv]) == 0
    rt = json.loads(capsys.readouterr().out)
    assert rt["tokens"] == ref["tokens"] and rt["prompt_tokens"] == ref["prompt_tokens"]
    with Pipeline(demo_export.directory) as pipe:
        one = pipe.answer(images[0], QUESTION, pipe.options(max_new_tokens=6))
        added = pipe.pre.spec.num_image_tokens  # the demo's word-level tokenizer has no token for the "\n" after it
    assert ref["prompt_tokens"] == one.prompt_tokens + added


def test_text_only_and_two_images_through_one_pipeline(demo_export, tmp_path):
    """The merged prompt paths side by side: no image (the decoder alone), then two images, on the export and the
    reference; the text-only prompt has no image positions, no pixels."""
    images = [str(p) for p in _images(tmp_path)]
    ref = TorchPipeline.from_checkpoint("demo")
    with Pipeline(demo_export.directory) as pipe:
        options = pipe.options(max_new_tokens=6)
        text = pipe.answer(None, QUESTION, options)
        two = pipe.answer(images, QUESTION, options)
        inputs = pipe.pre(None, QUESTION)
    assert not (inputs.input_ids == pipe.pre.spec.image_token_id).any() and inputs.pixel_values is None
    assert text.prompt_tokens == inputs.input_ids.shape[1]
    assert two.prompt_tokens == text.prompt_tokens + 2 * pipe.pre.spec.num_image_tokens  # no token for the "\n"
    assert text.tokens == ref.answer(None, QUESTION, ref.options(max_new_tokens=6)).tokens
    assert two.tokens == ref.answer(images, QUESTION, ref.options(max_new_tokens=6)).tokens
