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


def test_text_only_prompt_has_no_image_positions(pre):
    """No image: the template's turn holds the question alone, no image positions, no pixels, no text guide."""
    inputs = pre(None, "what color is the circle?")
    assert inputs.prompt == pre.prompt("what color is the circle?").replace("<image>\n", "")
    ids = inputs.input_ids[0].tolist()
    assert IMAGE_PLACEHOLDER_ID not in ids and ids[0] == pre.tokenizer.token_to_id("<s>")
    assert inputs.pixel_values is None and inputs.crops is None and inputs.guide_ids is None
    assert pre.text("USER: hi ASSISTANT:", raw=True).prompt == "USER: hi ASSISTANT:"
    with pytest.raises(TgedgeError, match="text-only prompt must not contain <image>"):
        pre(None, "<image> what color?")
    with pytest.raises(TgedgeError, match="empty prompt"):
        pre.text("  ")


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


JINJA_ITEMS = ("{% for m in messages %}U: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
               "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} A:")


@pytest.mark.parametrize("template", [PromptTemplate("vicuna_v1"), PromptTemplate("jinja", JINJA_ITEMS)])
def test_template_places_none_one_or_several_images(template):
    """images 0 is the text-only turn, N one image place per image first, in order; the question the same."""
    turns = [template.render("what color?", images=n) for n in range(3)]
    assert [t.count("<image>\n") for t in turns] == [0, 1, 2]
    assert turns[1].replace("<image>\n", "") == turns[2].replace("<image>\n", "") == turns[0]
    assert "<image>\n<image>\nwhat color?" in turns[2]


def test_one_preprocessor_takes_no_image_one_or_two(pre, tmp_path):
    """A text-only prompt (image None) and a multi-image one (a list) through the same __call__."""
    images = [tiny.test_image(tmp_path / "a.png"), tiny.test_image(tmp_path / "b.png", size=(40, 30), seed=2)]
    none, one, two = pre(None, "what color?"), pre(images[0], "what color?"), pre(images, "what color?")
    assert none.pixel_values is None and none.crops is None and none.guide_ids is None
    assert [int((x.input_ids == IMAGE_PLACEHOLDER_ID).sum()) for x in (none, one, two)] == [0, 5, 10]
    assert one.pixel_values.shape == (1, 3, 28, 28) and two.pixel_values.shape == (2, 3, 28, 28)
    assert two.crops.shape == (2, 4, 3, 28, 28)
    np.testing.assert_array_equal(two.pixel_values[:1], one.pixel_values)
    np.testing.assert_array_equal(two.guide_ids, one.guide_ids)
    with pytest.raises(TgedgeError, match="no image: give at least one"):
        pre([], "what color?")


def test_preprocess_imports_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import tgedge, tgedge.preprocess, tgedge.prompt, tgedge.sampling\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- image modes, the pixel limit, preprocess.json --------------------------------------------------------------
SETTINGS = ImageSettings(shortest_edge=28, crop_hw=(28, 28))


def _modes():
    rng = np.random.RandomState(3)
    rgb = Image.fromarray((rng.rand(30, 40, 3) * 255).astype("uint8"))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray((rng.rand(30, 40) * 255).astype("uint8")))
    p = rgb.convert("P")
    p.info["transparency"] = 0
    return {"L": rgb.convert("L"), "LA": rgba.convert("LA"), "RGBA": rgba, "P": rgb.convert("P"), "P+transparency": p,
            "CMYK": rgb.convert("CMYK"), "1": rgb.convert("1"), "F": rgb.convert("L").convert("F")}


@pytest.mark.parametrize("mode", list(_modes()))
def test_image_modes_as_transformers_converts_them(mode):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from tgedge.preprocess import clip_pixels

    image = _modes()[mode]
    theirs = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})(
        image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(clip_pixels(image, SETTINGS), theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode, dtype", [("I;16", np.uint16), ("I", np.int32)])
def test_sixteen_bit_grey_is_scaled_not_clipped(mode, dtype, tmp_path):
    from tgedge.preprocess import clip_pixels, load_image

    wide = (np.arange(30 * 40).reshape(30, 40) * 54).astype(dtype)  # 0 .. 64746
    image = Image.fromarray(wide) if mode == "I;16" else Image.fromarray(wide, "I")
    assert image.mode == mode
    if mode == "I;16":  # as a 16-bit PNG file too
        image.save(tmp_path / "grey16.png")
        image = load_image(tmp_path / "grey16.png")
        assert image.mode == "I;16"
    eight = Image.fromarray(np.rint(wide / 257).astype("uint8"), "L")
    np.testing.assert_array_equal(clip_pixels(image, SETTINGS), clip_pixels(eight, SETTINGS))
    assert clip_pixels(image, SETTINGS).std() > 0.5  # not one white plane


def test_pixel_limit(tmp_path, monkeypatch):
    from tgedge.preprocess import MAX_PIXELS_ENV, load_image

    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "50000")
    with pytest.raises(TgedgeError, match=r"big.png: image is 300x200 \(0 Mpx\), over the limit .*TGEDGE_MAX_IMAGE_PIXELS"):
        load_image(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "60000")
    assert load_image(path).size == (300, 200)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(TgedgeError, match="TGEDGE_MAX_IMAGE_PIXELS='lots': expected a whole number"):
        load_image(path)


def big_png_header(path, width, height):
    """A PNG file that claims width x height pixels (a decompression bomb's header, nothing to decode)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_pil_limit_is_replaced_by_tgedges(tmp_path, monkeypatch):
    """An image over PIL's own bomb limit is tgedge's one-line error, or decodes when the user raised the limit."""
    from tgedge.preprocess import MAX_PIXELS_ENV, load_image

    path = big_png_header(tmp_path / "wide.png", 20000, 20000)  # 400 Mpx: refused from its header
    with pytest.raises(TgedgeError, match=r"image is 20000x20000 \(400 Mpx\), over the limit of 179 Mpx"):
        load_image(path)
    small = tmp_path / "small.png"
    Image.new("L", (300, 200)).save(small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's limit is not what decides, tgedge's is
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert load_image(small).size == (300, 200)
    assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.mark.parametrize("change, match", [
    (lambda d: d["image"].update(std=[0.2, 0.0, 0.2]), r"image.image_std must be > 0 .*divides by zero"),
    (lambda d: d["image"].update(mean=[0.5, "x", 0.5], crop_hw=[0, 28]),
     r"image.crop_size .* must be integers in \[1, 8192\].*image.image_mean must be 3 finite numbers"),
    (lambda d: d.update(num_image_tokens="5", pad_to_square=1), "num_image_tokens must be an integer >= 1.*pad_to_square"),
    (lambda d: d["template"].update(name="nope"), "template.name 'nope' is not a built-in template"),
    (lambda d: d.update(extra=1), r"malformed \(TypeError"),
    (lambda d: d.pop("image"), r"malformed \(KeyError: 'image'\)"),
])
def test_preprocess_json_checked_at_load(pre, tmp_path, change, match):
    import json

    pre.save(tmp_path)
    d = json.loads((tmp_path / "preprocess.json").read_text())
    change(d)
    (tmp_path / "preprocess.json").write_text(json.dumps(d))
    with pytest.raises(TgedgeError, match=f"preprocess.json: .*{match}"):
        Preprocessor.from_dir(tmp_path)


def test_preprocess_files_stay_inside_the_export(pre, tmp_path):
    (tmp_path / "export").mkdir()
    pre.save(tmp_path / "export")
    (tmp_path / "elsewhere.json").write_bytes((tmp_path / "export" / "tokenizer.json").read_bytes())
    assert Preprocessor.from_dir(tmp_path / "export", {"tokenizer": "tokenizer.json"}).spec == pre.spec
    with pytest.raises(TgedgeError, match=r"manifest.json files.tokenizer: '../elsewhere.json' resolves to .* outside"):
        Preprocessor.from_dir(tmp_path / "export", {"tokenizer": "../elsewhere.json"})
    (tmp_path / "export" / "preprocess.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(TgedgeError, match="preprocess.json: not valid JSON"):
        Preprocessor.from_dir(tmp_path / "export")


def test_processor_config_checked():
    with pytest.raises(TgedgeError, match=r"p.json: rescale_factor must be a finite number > 0 \(got nan\); image_std must be > 0"):
        ImageSettings.from_processor_config({"image_std": [0, 0, 0], "rescale_factor": float("nan")}, "p.json")
    with pytest.raises(TgedgeError, match=r"p.json: malformed image processor settings"):
        ImageSettings.from_processor_config({"size": "big"}, "p.json")


def test_empty_prompt_refused(pre):
    for prompt in ("", "   ", "<image>\n"):
        with pytest.raises(TgedgeError, match="empty prompt"):
            pre.prompt(prompt)


def test_a_tokenizer_too_small_for_the_model_is_refused(pre):
    """Another model's tokenizer (the probe's: the guide's CLIP one for a Qwen2 decoder, whose EOS id is 151645)
    would answer nothing; the EOS id beyond its vocabulary names it."""
    from dataclasses import replace

    beyond = pre.tokenizer.vocab_size
    with pytest.raises(TgedgeError, match=rf"t.json: has {beyond} tokens, but this model's EOS id {beyond} lies "):
        Preprocessor(replace(pre.spec, eos_token_ids=[beyond]), pre.tokenizer, pre.guide_tokenizer)
    assert Preprocessor(replace(pre.spec, eos_token_ids=[beyond - 1]), pre.tokenizer, pre.guide_tokenizer)
    with pytest.raises(TgedgeError, match="the same vocabulary as the text guide's CLIP tokenizer"):
        Preprocessor(pre.spec, pre.guide_tokenizer, pre.guide_tokenizer)
