"""Tiny models and tokenizers built inside the tests: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer

from tgedge.demo import word_tokenizer as _word_tokenizer

WORDS = ("what color is the circle square triangle red green blue yes no how many are there shape at top left "
         "right bottom a an of in image picture describe USER ASSISTANT system user assistant").split()
PUNCT = [":", "?", ".", ",", "!", "\n"]
IMAGE_SIZE, PATCH = 28, 14  # 4 patches per view


def word_tokenizer(path: Path, specials: list[str], bos: str | None, eos: str | None = None) -> Path:
    return _word_tokenizer(path, specials, bos, eos, WORDS + PUNCT)


def llm_specials(family: str) -> tuple[list[str], str | None, str]:
    if family == "qwen2":
        return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], None, "<|im_end|>"
    return ["<unk>", "<s>", "</s>", "<image>"], "<s>", "</s>"


def clip_tokenizer(path: Path) -> Path:
    # "!" at id 0 as in CLIP's BPE vocabulary: the reference masks id 0 out of the text guide.
    return word_tokenizer(path, ["!", "<|startoftext|>", "<|endoftext|>"], "<|startoftext|>", "<|endoftext|>")


def test_image(path: Path, size=(50, 40), seed=0) -> Path:
    arr = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    Image.fromarray(arr).save(path)
    return path


def vision_config_dict() -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=16)


def decoder_config_dict(family: str, vocab: int) -> dict:
    d = dict(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    if family == "qwen2":
        d.update(tie_word_embeddings=True, rope_theta=1000000.0)
    return d


def hf_llava(directory: Path, family: str = "llama", keys: str = "saved", shards: bool = False, seed: int = 0,
             rope_scaling: dict | None = None):
    """A random transformers LlavaForConditionalGeneration saved with save_pretrained, plus its processor.

    keys: "saved" (as this transformers writes them), "legacy" (`vision_tower.vision_model.*`,
    `language_model.model.*`) or "nested" (`model.vision_tower.*`, `model.language_model.*`, `lm_head.*`).
    """
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast, Qwen2Config)

    specials, bos, eos = llm_specials(family)
    tok_path = word_tokenizer(directory / "tokenizer.json", specials, bos)
    tok = Tokenizer.from_file(str(tok_path))
    vocab = tok.get_vocab_size()
    text_cls = Qwen2Config if family == "qwen2" else LlamaConfig
    extra = {"rope_scaling": rope_scaling} if rope_scaling else {}
    text = text_cls(**decoder_config_dict(family, vocab), **extra, eos_token_id=tok.token_to_id(eos),
                    bos_token_id=tok.token_to_id(bos) if bos else None)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision_config_dict()), text_config=text,
                      image_token_index=tok.token_to_id("<image>"),
                      tie_word_embeddings=family == "qwen2")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger-than-init weights so that logits differ clearly between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(directory, max_shard_size="20KB" if shards else "5GB")
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), bos_token=bos, eos_token=eos, unk_token=specials[0])
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=fast, patch_size=PATCH,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    processor.save_pretrained(directory)
    if keys != "saved":
        rewrite_keys(directory, keys)
    return model, processor


def rewrite_keys(directory: Path, generation: str) -> None:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for f in files:
        state = load_file(str(f))
        save_file({_rekey(k, generation): v for k, v in state.items()}, str(f), metadata={"format": "pt"})
    if index:
        index["weight_map"] = {_rekey(k, generation): v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))


def _rekey(k: str, generation: str) -> str:
    base = k
    for old, new in (("vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.", "vision_tower."),
                     ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if base.startswith(old) and not base.startswith("language_model.lm_head."):
            base = new + base[len(old):]
            break
    if generation == "legacy":
        return base.replace("vision_tower.", "vision_tower.vision_model.", 1) if base.startswith("vision_tower.") else base
    for old, new in (("vision_tower.", "model.vision_tower.vision_model."),
                     ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if base.startswith(old):
            return new + base[len(old):]
    return base


def clip_dir(directory: Path, seed: int = 1) -> Path:
    """A transformers CLIPModel directory: both towers, image processor, tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok_path = clip_tokenizer(directory / "tokenizer.json")
    tok = Tokenizer.from_file(str(tok_path))
    text = dict(vocab_size=tok.get_vocab_size(), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, eos_token_id=tok.token_to_id("<|endoftext|>"),
                bos_token_id=tok.token_to_id("<|startoftext|>"), pad_token_id=tok.token_to_id("<|endoftext|>"),
                projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision_config_dict(), projection_dim=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    return directory


# Reference-layout (b) sizes for the tiny TG modules; the reference hard-codes ViT-L's values instead.
TG_OVERRIDES = dict(tg_fom_num_heads=4, tg_dp_num_latents=8, tg_dp_num_heads=4, tg_dp_head_dim=8, tg_dp_num_kv_heads=2)

ORIGINAL_NAMES = [("language_model.", "model."), ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                  ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                  ("mm_cross_attn.", "model.mm_cross_attn."), ("mm_patch_encoder.", "model.mm_patch_encoder."),
                  ("lm_head.", "lm_head.")]


def original_tg_checkpoint(directory: Path, clip: Path, family: str = "llama", seed: int = 2,
                           with_unused: bool = True) -> Path:
    """A TG-LLaVA checkpoint in the original repository layout (b), random non-zero TG weights, no CLIP towers."""
    from tgedge.layouts import original
    from tgedge.model import TGLlava

    specials, bos, eos = llm_specials(family)
    tok = Tokenizer.from_file(str(word_tokenizer(directory / "tokenizer.json", specials, bos)))
    model_type = "llava_qwen_text_learnable_query" if family == "qwen2" else "llava_llama_text_learnable_query"
    raw = dict(model_type=model_type, **decoder_config_dict(family, tok.get_vocab_size()),
               mm_hidden_size=32, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               mm_projector_type="mlp2x_gelu", image_aspect_ratio="pad", mm_patch_merge_type="flat",
               mm_vision_tower="openai/clip-vit-large-patch14-336", mm_text_tower="openai/clip-vit-large-patch14-336",
               eos_token_id=tok.token_to_id(eos), bos_token_id=tok.token_to_id(bos) if bos else None, **TG_OVERRIDES)
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    clip_raw = json.loads((clip / "config.json").read_text())
    cfg = original.model_config(raw, clip_raw, True, True)
    torch.manual_seed(seed)
    model = TGLlava(cfg)
    state = {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.startswith(("vision_tower.", "text_tower.")):
                continue
            p = torch.randn_like(p) * 0.2 if p.dim() > 1 or "zero_layer" in name else p + 0.1 * torch.randn_like(p)
            for new, old in ORIGINAL_NAMES:
                if name.startswith(new):
                    state[old + name[len(new):]] = p.contiguous()
                    break
    if with_unused:  # what the reference's BertLMHeadModel also saves, unused by TG-FOM
        d = cfg.feature_mask.hidden_size
        q = "model.mm_cross_attn.Qformer."
        state.update({q + "cls.predictions.bias": torch.zeros(30), q + "bert.embeddings.word_embeddings.weight":
                      torch.randn(30, d), q + "bert.embeddings.position_embeddings.weight": torch.randn(8, d),
                      q + "bert.embeddings.position_ids": torch.arange(8)[None],
                      q + "bert.encoder.layer.0.intermediate.dense.weight": torch.randn(4 * d, d),
                      q + "bert.encoder.layer.0.output.dense.weight": torch.randn(d, 4 * d)})
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
