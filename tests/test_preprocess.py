"""Preprocessing: x2 crops vs torch, pad-to-square, prompts and templates, the text guide, torch-free import."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from tgedge.errors import TgedgeError
from tgedge.preprocess import (IMAGE_PLACEHOLDER_ID, ImageSettings, Preprocessor, PreprocessSpec, Tokenizer,
                               detail_crops, pad_to_square, upsample2x)
from tgedge.prompt import PromptTemplate


def test_upsample_matches_torch_interpolate():
    x = np.random.RandomState(0).randn(3, 7, 5).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], scale_factor=2, mode="bilinear",
                                          align_corners=False)[0].numpy()
    np.testing.assert_allclose(upsample2x(x), ref, atol=1e-6, rtol=0)


def test_detail_crops_are_the_quadrants_of_the_x2_view():
    x = np.random.RandomState(1).randn(3, 6, 6).astype(np.float32)
    crops, big = detail_crops(x), upsample2x(x)
    assert crops.shape == (4, 3, 6, 6)
    np.testing.assert_array_equal(crops[1], big[:, :6, 6:])  # top-right
    np.testing.assert_array_equal(crops[2], big[:, 6:, :6])  # bottom-left


def test_pad_to_square_uses_int_mean_colour():
    image = Image.new("RGB", (10, 4), (255, 0, 0))
    out = pad_to_square(image, (0.5, 0.25, 0.999))
    assert out.size == (10, 10)
    assert out.getpixel((0, 0)) == (127, 63, 254)  # int(m * 255), not rounded
    assert out.getpixel((5, 5)) == (255, 0, 0)


@pytest.fixture
def pre(tmp_path):
    tok = Tokenizer(tiny.word_tokenizer(tmp_path / "t.json", *tiny.llm_specials("llama")[:2]))
    guide = Tokenizer(tiny.clip_tokenizer(tmp_path / "g.json"))
    spec = PreprocessSpec(image=ImageSettings(shortest_edge=28, crop_hw=(28, 28)),
                          template=PromptTemplate("vicuna_v1"), num_image_tokens=5,
                          image_token_id=IMAGE_PLACEHOLDER_ID, detail_crops=True, text_guide_length=6)
    return Preprocessor(spec, tok, guide)


def test_vicuna_prompt_as_the_reference_builds_it(pre):
    assert pre.prompt("what color is the circle?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nwhat color is the circle? ASSISTANT:")
    assert pre.prompt("<image> what color?") == pre.prompt("what color?")


def test_chunked_ids_keep_one_bos(pre):
    ids = pre.input_ids("USER: <image>\nwhat color? ASSISTANT:")[0].tolist()
    bos = pre.tokenizer.token_to_id("<s>")
    assert ids.count(bos) == 1 and ids[0] == bos
    assert ids.count(IMAGE_PLACEHOLDER_ID) == 5


def test_text_guide_drops_image_and_cuts_to_context(pre):
    ids = pre.guide_ids("<image>\nwhat color is the circle ?")[0].tolist()
    g = pre.guide_tokenizer
    assert ids[:3] == [g.token_to_id("<|startoftext|>"), g.token_to_id("what"), g.token_to_id("color")]
    assert len(ids) == 6  # sliced as the reference slices ([:77] for CLIP), EOS may fall off


def test_image_twice_is_an_error(pre):
    with pytest.raises(TgedgeError, match="2 <image> placeholders"):
        pre.prompt("<image> what <image> color?")
    with pytest.raises(TgedgeError, match="exactly once"):
        pre.prompt("<image> a <image>", raw=True)


def test_spec_roundtrips_through_json(pre, tmp_path):
    pre.save(tmp_path)
    again = Preprocessor.from_dir(tmp_path)
    assert again.spec == pre.spec


def test_jinja_template_renders_in_sandbox():
    t = PromptTemplate("jinja", "{% for m in messages %}U: <image>\n{{ m['content'][1]['text'] }}{% endfor %} A:")
    assert t.render("hi?") == "U: <image>\nhi? A:"
    with pytest.raises(TgedgeError, match="chat template failed"):
        PromptTemplate("jinja", "{{ ''.__class__.__mro__[1].__subclasses__() }}").render("x")


def test_preprocess_imports_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import tgedge, tgedge.preprocess, tgedge.prompt, tgedge.sampling\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n")
    subprocess.run([sys.executable, "-c", code], check=True)
