"""TG-LLaVA checkpoints: original layout (b) + a CLIP dir, tgedge's layout (c), and the TG ablations."""

import json
import os

import numpy as np
import pytest
import torch

import tiny
from tgedge.checkpoint import load_model, save_checkpoint
from tgedge.errors import TgedgeError
from tgedge.reference import TorchPipeline

QUESTION = "how many red circle are there?"


@pytest.fixture(scope="module")
def tg(tmp_path_factory):
    root = tmp_path_factory.mktemp("tg")
    clip = tiny.clip_dir(root / "clip")
    ckpt_dir = root / "original"
    ckpt_dir.mkdir()
    tiny.original_tg_checkpoint(ckpt_dir, clip)
    image = tiny.test_image(root / "image.png", size=(30, 44))
    return ckpt_dir, clip, image


def _last_logits(model, pre, image, question=QUESTION):
    pipe = TorchPipeline(model, pre)
    x = pipe.embeddings(pre(image, question))
    with torch.no_grad():
        return model(x, torch.arange(x.shape[1]))[0, -1]


def test_original_layout_needs_clip_dir(tg):
    ckpt_dir, _, _ = tg
    with pytest.raises(TgedgeError, match="pass --clip DIR"):
        load_model(ckpt_dir)


def test_original_layout_loads_and_runs(tg):
    ckpt_dir, clip, image = tg
    model, ckpt = load_model(ckpt_dir, clip)
    cfg = ckpt.config
    assert cfg.feature_mask and cfg.detail_perceiver and cfg.pad_to_square
    assert ckpt.preprocessor.spec.template.name == "vicuna_v1"
    inputs = ckpt.preprocessor(image, QUESTION)
    assert inputs.crops.shape == (1, 4, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    assert (inputs.input_ids == ckpt.preprocessor.spec.image_token_id).sum() == 4 + 8  # patches + latents
    assert inputs.guide_ids[0, 0] == ckpt.preprocessor.guide_tokenizer.token_to_id("<|startoftext|>")
    assert model.mm_cross_attn.zero_layer.weight.abs().sum() > 0
    answer = TorchPipeline(model, ckpt.preprocessor).answer(image, QUESTION, None)
    assert answer.tokens and answer.prompt_tokens == inputs.input_ids.shape[1]


def test_tg_modules_change_the_logits(tg):
    ckpt_dir, clip, image = tg
    model, ckpt = load_model(ckpt_dir, clip)
    with_tg = _last_logits(model, ckpt.preprocessor, image)
    with torch.no_grad():
        model.mm_cross_attn.zero_layer.weight.zero_()
        model.mm_cross_attn.zero_layer.bias.zero_()
    assert (with_tg - _last_logits(model, ckpt.preprocessor, image)).abs().max() > 1e-3


def test_layout_c_roundtrip_identical_logits(tg, tmp_path):
    ckpt_dir, clip, image = tg
    model, ckpt = load_model(ckpt_dir, clip)
    out = save_checkpoint(model, ckpt.preprocessor, tmp_path / "tgedge")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "llava" and saved["tg"]["detail_perceiver"]
    model2, ckpt2 = load_model(out)
    assert ckpt2.config.layout == "tgedge"
    a, b = ckpt.preprocessor(image, QUESTION), ckpt2.preprocessor(image, QUESTION)
    assert a.prompt == b.prompt
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert torch.equal(_last_logits(model, ckpt.preprocessor, image), _last_logits(model2, ckpt2.preprocessor, image))
    assert not list(tmp_path.glob(".tgedge.*"))  # no temporary folder left behind
    umask = os.umask(0)
    os.umask(umask)
    for f in out.rglob("*"):  # readable like any file the user writes (safetensors alone writes 0600)
        assert f.stat().st_mode & 0o777 == (0o777 if f.is_dir() else 0o666) & ~umask, f


def test_zero_mask_and_no_perceiver_is_plain_llava(tg):
    ckpt_dir, clip, image = tg
    tg_model, ckpt = load_model(ckpt_dir, clip)
    with torch.no_grad():
        tg_model.mm_cross_attn.zero_layer.weight.zero_()
        tg_model.mm_cross_attn.zero_layer.bias.zero_()
    tg_model.without_tg(feature_mask=False, detail_perceiver=True)
    plain, _ = load_model(ckpt_dir, clip)
    plain.without_tg()
    assert not plain.cfg.has_tg and tg_model.mm_cross_attn is not None
    pre = ckpt.preprocessor.replace(num_image_tokens=plain.cfg.num_image_tokens, detail_crops=False)
    assert torch.equal(_last_logits(tg_model, pre, image), _last_logits(plain, pre, image))


def test_cached_decode_equals_full_recompute(tg):
    ckpt_dir, clip, image = tg
    model, ckpt = load_model(ckpt_dir, clip)
    pipe = TorchPipeline(model, ckpt.preprocessor)
    x = pipe.embeddings(ckpt.preprocessor(image, QUESTION))
    tokens = pipe.answer(image, QUESTION, pipe.options(max_new_tokens=20, eos_token_ids=[], stop_strings=[])).tokens
    assert len(tokens) == 20
    model.language_model.setup_cache(1, x.shape[1] + 20)
    with torch.no_grad():
        cached = [model(x, torch.arange(x.shape[1]))[0, -1]]
        for i, tok in enumerate(tokens[:-1]):
            cached.append(model(model.language_model.embed_tokens(torch.tensor([[tok]])),
                                torch.tensor([x.shape[1] + i]))[0, -1])
        model.language_model.clear_cache()
        for step in range(20):
            seq = torch.cat([x, model.language_model.embed_tokens(torch.tensor([tokens[:step]], dtype=torch.long))], dim=1)
            full = model(seq, torch.arange(seq.shape[1]))[0, -1]
            assert (full - cached[step]).abs().max().item() < 1e-5, step
            assert int(full.argmax()) == tokens[step]


def test_plain_llava_checkpoint_said_once(tmp_path, caplog):
    tiny.hf_llava(tmp_path)
    with caplog.at_level("WARNING", logger="tgedge"):
        model, _ = load_model(tmp_path)
    assert not model.cfg.has_tg
    assert sum("plain LLaVA" in r.message for r in caplog.records) == 1


def test_ablations_at_inference(tg):
    ckpt_dir, clip, image = tg
    pipe = TorchPipeline.from_checkpoint(ckpt_dir, clip).ablate("both")
    assert pipe.model.mm_patch_encoder is None and pipe.model.mm_cross_attn.zero_layer.weight.abs().sum() == 0
    inputs = pipe.pre(image, QUESTION)
    assert inputs.crops is None
    assert (inputs.input_ids == pipe.pre.spec.image_token_id).sum() == 4  # the main view's patches only
    assert pipe.answer(image, QUESTION).tokens
    with pytest.raises(TgedgeError, match="no TG-DP to ablate"):
        pipe.ablate("dp")
