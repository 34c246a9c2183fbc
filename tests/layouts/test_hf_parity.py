"""tgedge's reference vs transformers' LLaVA on tiny random checkpoints (the oracle is transformers)."""

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from tgedge.checkpoint import load_model
from tgedge.reference import TorchPipeline

QUESTION = "what color is the circle?"
VARIANTS = [("llama", "saved", False), ("llama", "legacy", True), ("llama", "nested", False),
            ("qwen2", "saved", True), ("qwen2", "nested", False)]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: "-".join(map(str, v)))
def pair(request, tmp_path_factory):
    family, keys, shards = request.param
    d = tmp_path_factory.mktemp(f"{family}-{keys}")
    hf, processor = tiny.hf_llava(d, family, keys=keys, shards=shards)
    model, ckpt = load_model(d)
    return hf, processor, model, ckpt, tiny.test_image(d / "image.png")


def test_layout_files(pair):
    _, _, _, ckpt, _ = pair
    files = {p.name for p in ckpt.path.iterdir()}
    assert "model.safetensors.index.json" in files or "model.safetensors" in files


def test_inputs_match_llava_processor(pair):
    _, processor, _, ckpt, image = pair
    inputs = ckpt.preprocessor(image, QUESTION)
    theirs = processor(images=Image.open(image), text=inputs.prompt, return_tensors="np")
    np.testing.assert_array_equal(inputs.input_ids, theirs["input_ids"])
    np.testing.assert_array_equal(inputs.pixel_values, theirs["pixel_values"])


def test_last_token_logits_match(pair):
    hf, processor, model, ckpt, image = pair
    inputs = ckpt.preprocessor(image, QUESTION)
    x = TorchPipeline(model, ckpt.preprocessor).embeddings(inputs)
    with torch.no_grad():
        ours = model(x, torch.arange(x.shape[1]))[0, -1]
        theirs = hf(input_ids=torch.from_numpy(inputs.input_ids),
                    pixel_values=torch.from_numpy(inputs.pixel_values)).logits[0, -1]
    assert ours.abs().max() > 0.1  # logits that say something
    assert (ours - theirs).abs().max().item() < 1e-4


def test_greedy_tokens_match_generate(pair):
    hf, processor, model, ckpt, image = pair
    pipe = TorchPipeline(model, ckpt.preprocessor)
    options = pipe.options(max_new_tokens=16, eos_token_ids=[], stop_strings=[])
    ours = pipe.answer(image, QUESTION, options).tokens
    inputs = ckpt.preprocessor(image, QUESTION)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.from_numpy(inputs.input_ids),
                          pixel_values=torch.from_numpy(inputs.pixel_values), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    theirs = out[0, inputs.input_ids.shape[1]:].tolist()
    assert len(ours) == 16 and ours == theirs
    assert len(set(ours)) > 1  # not a degenerate repeat of one token


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
], ids=["linear", "llama3"])
def test_rope_scaling_matches(tmp_path, scaling):
    hf, _ = tiny.hf_llava(tmp_path, "llama", rope_scaling=scaling)
    model, ckpt = load_model(tmp_path)
    assert model.cfg.decoder.rope_scaling["rope_type"] == scaling["rope_type"]
    inputs = ckpt.preprocessor(tiny.test_image(tmp_path / "i.png"), QUESTION)
    x = TorchPipeline(model, ckpt.preprocessor).embeddings(inputs)
    with torch.no_grad():
        ours = model(x, torch.arange(x.shape[1]))[0, -1]
        theirs = hf(input_ids=torch.from_numpy(inputs.input_ids),
                    pixel_values=torch.from_numpy(inputs.pixel_values)).logits[0, -1]
    assert (ours - theirs).abs().max().item() < 1e-4


def test_two_images_match_llava_processor_and_generate(pair, tmp_path):
    """Several images: placed in order at the template's image places, as transformers' LLaVA places them."""
    hf, processor, model, ckpt, image = pair
    images = [image, tiny.test_image(tmp_path / "b.png", size=(33, 47), seed=5)]
    inputs = ckpt.preprocessor(images, QUESTION)
    assert inputs.prompt.count("<image>") == 2 and inputs.pixel_values.shape[0] == 2
    theirs = processor(images=[Image.open(p) for p in images], text=inputs.prompt, return_tensors="np")
    np.testing.assert_array_equal(inputs.input_ids, theirs["input_ids"])
    np.testing.assert_array_equal(inputs.pixel_values, theirs["pixel_values"])
    pipe = TorchPipeline(model, ckpt.preprocessor)
    options = pipe.options(max_new_tokens=12, eos_token_ids=[], stop_strings=[])
    ours = pipe.answer(images, QUESTION, options).tokens
    with torch.no_grad():
        out = hf.generate(input_ids=torch.from_numpy(inputs.input_ids),
                          pixel_values=torch.from_numpy(inputs.pixel_values), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert ours == out[0, inputs.input_ids.shape[1]:].tolist()
    swapped = pipe.embeddings(ckpt.preprocessor(images[::-1], QUESTION))
    assert not np.allclose(swapped.numpy(), pipe.embeddings(inputs).numpy())  # the order is kept, not ignored
