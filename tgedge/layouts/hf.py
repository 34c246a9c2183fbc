"""The Hugging Face transformers LLaVA layout (`model_type: llava`): `config.json` with `vision_config` and
`text_config`, `*.safetensors` in either key generation transformers has written, `tokenizer.json`, the image
processor config and a chat template. No TG weights: such a checkpoint runs as plain LLaVA."""

from __future__ import annotations

from pathlib import Path

from tgedge.config import (CLIP_VISION, DECODER, DECODER_FAMILIES, HF_LAYOUT, ModelConfig, ProjectorConfig,
                           consistency, decoder_config_from, eos_list, section_problems, vision_config_from_clip)
from tgedge.errors import TgedgeError
from tgedge.layouts.common import Parts, find_chat_template, find_image_settings, read_weights, rename
from tgedge.preprocess import Tokenizer
from tgedge.prompt import PromptTemplate

NAME = HF_LAYOUT
MODEL_TYPES = ("llava",)

# (checkpoint prefix -> tgedge prefix), first match wins; both transformers key generations. A fusion family's own
# modules (tgedge's layout) are stored under tgedge's names and pass unrenamed.
PREFIXES = [
    ("model.vision_tower.vision_model.", "vision_tower."), ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."), ("vision_tower.", "vision_tower."),
    ("model.language_model.", "language_model."), ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."), ("multi_modal_projector.", "multi_modal_projector."),
    ("text_tower.text_model.", "text_tower."), ("text_tower.", "text_tower."),
]

# config.json's top level (see tgedge.config for the kinds)
TOP = {"image_token_index": "id?", "vision_feature_select_strategy": "str", "projector_hidden_act": "str",
       "multimodal_projector_bias": "bool", "tie_word_embeddings": "bool", "image_aspect_ratio": "str?",
       "vision_config": "dict?", "text_config": "dict", "tg": "dict"}
WHERE = {"vision": "vision_config.", "decoder": "text_config.", "text": "tg.text_config.", "tg": "tg."}


def detects(raw: dict) -> bool:
    return raw.get("model_type") == "llava" and "tg" not in raw


# -- config.json checks -----------------------------------------------------------------------------------------
def schema_problems(d: dict) -> list[str]:
    """The top level, vision_config and text_config of kinds their schemas say."""
    out = section_problems(d, TOP, "")
    vision, decoder = d.get("vision_config") or {}, d.get("text_config") or {}
    for section, schema, name in ((vision, CLIP_VISION, "vision_config."), (decoder, DECODER, "text_config.")):
        if isinstance(section, dict):
            out += section_problems(section, schema, name)
    return out


def missing_decoder_keys(d: dict) -> list[str]:
    decoder = d.get("text_config") or {}
    if "text_config" not in d or not isinstance(decoder, dict):
        return []
    return [f"text_config.{k} is missing" for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                     "num_hidden_layers", "num_attention_heads") if k not in decoder]


def token_ids(d: dict) -> dict:
    """The token ids config.json names, to check against the decoder's vocabulary."""
    decoder = d.get("text_config") or {}
    ids = {f"text_config.{k}": decoder[k] for k in ("bos_token_id", "eos_token_id") if decoder.get(k) is not None}
    if d.get("image_token_index") is not None:
        ids["image_token_index"] = d["image_token_index"]
    elif "image_token_index" not in d:
        ids["image_token_index"] = 32000  # the default model_config assumes
    return ids


def check(d: dict, path: Path) -> None:
    """Refuse a config.json with any wrong type, non-finite or out-of-range value or inconsistency, listing every
    problem in one message."""
    problems = schema_problems(d) + missing_decoder_keys(d)
    if not problems:
        problems = consistency(d.get("vision_config") or {}, d.get("text_config") or {}, None, token_ids(d), WHERE)
    if problems:
        raise TgedgeError(f"{path}: {'; '.join(problems)}")


# -- conversion -------------------------------------------------------------------------------------------------
def model_config(d: dict) -> ModelConfig:
    text_d = d.get("text_config") or {}
    family = text_d.get("model_type", "llama")
    if family not in DECODER_FAMILIES:
        raise TgedgeError(f"unsupported text_config.model_type {family!r} (supported: {', '.join(DECODER_FAMILIES)})")
    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise TgedgeError(f"vision_feature_layer {layer!r}: only a single layer index is supported")
    vision = vision_config_from_clip(d.get("vision_config") or {}, layer,
                                     d.get("vision_feature_select_strategy", "default"))
    decoder = decoder_config_from(text_d, family, tie_default=bool(d.get("tie_word_embeddings", False)))
    projector = ProjectorConfig(vision.hidden_size, decoder.hidden_size, d.get("projector_hidden_act", "gelu"),
                                bool(d.get("multimodal_projector_bias", True)))
    # `image_token_index: null` is tgedge's mark for a vocabulary without an image token (from the original layout).
    image_token_index = d["image_token_index"] if "image_token_index" in d else 32000
    return ModelConfig(layout=NAME, vision=vision, projector=projector, decoder=decoder,
                       image_token_index=image_token_index, pad_to_square=d.get("image_aspect_ratio") == "pad",
                       bos_token_id=text_d.get("bos_token_id"), eos_token_id=eos_list(text_d.get("eos_token_id")),
                       model_type="llava")


# -- reading ----------------------------------------------------------------------------------------------------
def read(path: Path, raw: dict, clip: Path | None = None) -> Parts:
    check(raw, path / "config.json")
    return read_checked(path, raw, model_config)


def read_checked(path: Path, raw: dict, convert, guide_tokenizer: Path | None = None) -> Parts:
    """A checked config.json's checkpoint in this layout's files, its config from `convert(raw)`."""
    weights = read_weights(path)
    weights = weights.renamed(rename(weights, PREFIXES))
    cfg = convert(raw)
    image = find_image_settings(path)
    tokenizer = Tokenizer(path / "tokenizer.json")
    jinja = find_chat_template(path)
    template = PromptTemplate("jinja", jinja) if jinja else PromptTemplate("llava")
    return Parts(cfg, weights, image, tokenizer, template, guide_tokenizer)
