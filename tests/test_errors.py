"""Each bad input raises TgedgeError with a message that names the problem (the CLI turns it into exit 2)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from tgedge.checkpoint import load_checkpoint, load_model
from tgedge.errors import TgedgeError
from tgedge.preprocess import load_image
from tgedge.reference import TorchPipeline


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    tiny.hf_llava(d)
    return d


def test_missing_dir(tmp_path):
    with pytest.raises(TgedgeError, match=r"nope: checkpoint directory not found"):
        load_checkpoint(tmp_path / "nope")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    with pytest.raises(TgedgeError, match=r"unknown model_type 'idefics3' \(supported: llava, "):
        load_checkpoint(tmp_path)


def test_missing_tensors_all_listed(hf_dir, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(hf_dir, d)
    state = load_file(str(d / "model.safetensors"))
    for k in [k for k in state if k.endswith(("norm.weight", "linear_2.bias"))]:
        del state[k]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(TgedgeError, match=r"missing \(8\): language_model\.layers\.0\.input_layernorm\.weight, .*"
                                          r"multi_modal_projector\.linear_2\.bias, vision_tower\.post_layernorm\.weight, vision_tower\.pre_layrnorm\.weight$"):
        load_model(d)


def test_unreadable_image(tmp_path):
    (tmp_path / "x.jpg").write_text("text")
    with pytest.raises(TgedgeError, match=r"x\.jpg: unreadable image"):
        load_image(tmp_path / "x.jpg")


def test_prompt_longer_than_context(hf_dir):
    pipe = TorchPipeline.from_checkpoint(hf_dir, context=10)
    with pytest.raises(TgedgeError, match=r"prompt is \d+ tokens \(image tokens included\), longer than the context \(10\)"):
        pipe.answer(tiny.test_image(hf_dir / "i.png"), "what color is the circle?")


def test_image_placeholder_twice(hf_dir):
    _, ckpt = load_model(hf_dir)
    with pytest.raises(TgedgeError, match="prompt has 2 <image> placeholders"):
        ckpt.preprocessor(tiny.test_image(hf_dir / "i.png"), "<image> what <image>?")


def test_tg_model_type_without_tg_weights(tmp_path):
    clip = tiny.clip_dir(tmp_path / "clip")
    d = tmp_path / "b"
    d.mkdir()
    tiny.original_tg_checkpoint(d, clip)
    state = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if "mm_" not in k or "projector" in k}
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(TgedgeError, match=r"no model\.mm_cross_attn\.\* or model\.mm_patch_encoder\.\* tensors"):
        load_checkpoint(d, clip)


def test_original_checkpoint_carrying_towers_uses_its_own(tmp_path):
    clip = tiny.clip_dir(tmp_path / "clip")
    d = tmp_path / "b"
    d.mkdir()
    tiny.original_tg_checkpoint(d, clip)
    state = load_file(str(d / "model.safetensors"))
    towers = load_file(str(clip / "model.safetensors"))
    for k, v in towers.items():
        if k.startswith("vision_model."):
            state["model.vision_tower.vision_tower." + k] = v + 1.0
        elif k.startswith("text_model."):
            state["model.text_tower.text_tower." + k] = v + 1.0
    save_file(state, str(d / "model.safetensors"))
    model, _ = load_model(d, clip)
    w = model.vision_tower.embeddings.patch_embedding.weight
    assert torch.equal(w, towers["vision_model.embeddings.patch_embedding.weight"] + 1.0)
    t = model.text_tower.embeddings.token_embedding.weight
    assert torch.equal(t, towers["text_model.embeddings.token_embedding.weight"] + 1.0)


def test_bf16_weights_compute_in_fp32(hf_dir, tmp_path):
    d = tmp_path / "bf16"
    shutil.copytree(hf_dir, d)
    state = load_file(str(d / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()},
              str(d / "model.safetensors"))
    model, ckpt = load_model(d)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref, _ = load_model(hf_dir)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    inputs = ckpt.preprocessor(tiny.test_image(tmp_path / "i.png"), "what color?")
    logits = [m(TorchPipeline(m, ckpt.preprocessor).embeddings(inputs), torch.arange(inputs.input_ids.shape[1]))
              for m in (model, ref)]
    assert torch.equal(logits[0], logits[1])


# -- config.json, index files and weights are checked at load, every problem in one message --------------------
def _edit_config(hf_dir, tmp_path, change):
    d = tmp_path / "c"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))  # NaN is written as the bare word, which json reads
    return d


@pytest.mark.parametrize("change, match", [
    (lambda c: c["text_config"].update(hidden_size="48", rms_norm_eps=float("nan")),
     r"text_config.hidden_size must be an integer >= 1 \(got '48'\); text_config.rms_norm_eps must be a finite number"),
    (lambda c: c["vision_config"].update(num_attention_heads=5),
     "vision_config.hidden_size 32 is not a multiple of num_attention_heads 5"),
    (lambda c: c["text_config"].update(num_key_value_heads=3),
     "text_config.num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (lambda c: c.update(image_token_index=10 ** 6), r"image_token_index 1000000 is outside the decoder's vocabulary"),
    (lambda c: c["text_config"].update(eos_token_id=[2, -1]), "text_config.eos_token_id must be a token id or a list"),
    (lambda c: c["vision_config"].update(patch_size=56), "patch_size 56 is larger than image_size 28"),
    (lambda c: c.update(tie_word_embeddings="yes", multimodal_projector_bias=None),
     r"multimodal_projector_bias must be true or false \(got None\); tie_word_embeddings must be true or false"),
])
def test_config_json_checked(hf_dir, tmp_path, change, match):
    d = _edit_config(hf_dir, tmp_path, change)
    with pytest.raises(TgedgeError, match=f"c/config.json: .*{match}"):
        load_checkpoint(d)


def test_config_json_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(TgedgeError, match="config.json: expected a JSON object, got list"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff{}")
    with pytest.raises(TgedgeError, match="config.json: not valid JSON"):
        load_checkpoint(tmp_path)


def test_non_finite_weights_refused(hf_dir, tmp_path):
    d = tmp_path / "nan"
    shutil.copytree(hf_dir, d)
    state = load_file(str(d / "model.safetensors"))
    k = next(k for k in state if k.endswith("linear_1.weight"))
    state[k][0, 0] = float("nan")
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(TgedgeError, match=r"non-finite weights \(NaN or inf\) in 1 tensor\(s\): multi_modal_projector"):
        load_checkpoint(d)


@pytest.mark.parametrize("weight_map, match", [
    ({"a": "../outside.safetensors"}, r"index.json weight_map: '../outside.safetensors' resolves to .* outside"),
    ({"a": "/etc/passwd"}, "index.json weight_map: '/etc/passwd' is an absolute path"),
    ({"a": 3}, "weight_map must be an object of tensor names to shard file names"),
    ([], "weight_map must be an object"),
])
def test_index_shards_stay_inside(hf_dir, tmp_path, weight_map, match):
    d = tmp_path / "sharded"
    shutil.copytree(hf_dir, d)
    (d / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(TgedgeError, match=match):
        load_checkpoint(d)


def test_tokenizer_larger_than_vocabulary(hf_dir, tmp_path):
    d = _edit_config(hf_dir, tmp_path, lambda c: None)
    cfg = json.loads((d / "config.json").read_text())
    vocab = cfg["text_config"]["vocab_size"]
    cfg["text_config"]["vocab_size"] = vocab - 1
    cfg["image_token_index"] = min(cfg["image_token_index"], vocab - 2)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TgedgeError, match=f"tokenizer.json: {vocab} tokens, more than the decoder's vocab_size {vocab - 1}"):
        load_checkpoint(d)


def test_save_checkpoint_never_over_its_source(hf_dir, tmp_path):
    from tgedge.checkpoint import save_checkpoint

    d = tmp_path / "c"
    shutil.copytree(hf_dir, d)
    model, ckpt = load_model(d)
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(TgedgeError, match="holds the input"):
        save_checkpoint(model, ckpt.preprocessor, d, force=True)
    assert sorted(p.name for p in d.iterdir()) == before
    out = save_checkpoint(model, ckpt.preprocessor, tmp_path / "saved", extra_files={"train_log.jsonl": "{}\n"})
    assert (out / "train_log.jsonl").read_text() == "{}\n"
    save_checkpoint(model, ckpt.preprocessor, out)  # its own earlier output: replaced
    assert not (out / "train_log.jsonl").exists()
