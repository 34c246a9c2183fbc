"""The original LLaVA / TG-LLaVA repository layout: `model_type` `llava_llama`, `llava_qwen`, ... with `mm_*` keys
and TG-LLaVA's `tg_*` sizes at config.json's top level; weights under `model.*` (the decoder), `model.mm_projector.*`,
TG-LLaVA's `model.mm_cross_attn.*` (TG-FOM) and `model.mm_patch_encoder.*` (TG-DP); the CLIP towers, their
tokenizer and image processor from a separate transformers CLIPModel directory (`--clip DIR`)."""

from __future__ import annotations

from pathlib import Path

from tgedge.config import (CLIP_TEXT, CLIP_VISION, DECODER, ORIGINAL_LAYOUT, ModelConfig, ProjectorConfig,
                           consistency, decoder_config_from, eos_list, read_config_json, section_problems,
                           text_config_from_clip, vision_config_from_clip)
from tgedge.errors import TgedgeError
import tgedge.layouts.tg_keys as tg_keys
from tgedge.layouts.common import Parts, find_image_settings, read_weights, rename
from tgedge.preprocess import Tokenizer
from tgedge.prompt import template_for_family

NAME = ORIGINAL_LAYOUT
USES_CLIP = True  # the CLIP towers live in a separate directory (--clip, mm_vision_tower)
MODEL_TYPES = {  # -> decoder family
    "llava_llama": "llama",
    "llava_qwen": "qwen2",
    "llava_qwen2": "qwen2",
    "llava_llama_text_learnable_query": "llama",
    "llava_qwen_text_learnable_query": "qwen2",
}
TG_MODEL_TYPES = {"llava_llama_text_learnable_query", "llava_qwen_text_learnable_query"}

# (checkpoint prefix -> tgedge prefix), first match wins
PREFIXES = [
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
    ("model.text_tower.text_tower.text_model.", "text_tower."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.mm_cross_attn.", "mm_cross_attn."), ("model.mm_patch_encoder.", "mm_patch_encoder."),
    ("model.", "language_model."), ("lm_head.", "lm_head."),
]
CLIP_PREFIXES = [("vision_model.", "vision_tower."), ("text_model.", "text_tower.")]

# What TG-LLaVA's checkpoints hold that the model does not use: the Q-Former's BERT text path and LM head.
IGNORED = (
    r"mm_cross_attn\.Qformer\.cls\..*", r"mm_cross_attn\.Qformer\.bert\.embeddings\.(word|position)_embeddings\..*",
    r"mm_cross_attn\.Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",
)

TOP = {**DECODER, **tg_keys.KEYS, "mm_vision_select_layer": "int", "mm_hidden_size": "+int", "mm_projector_type": "str",
       "mm_vision_select_feature": "str", "mm_patch_merge_type": "str", "image_aspect_ratio": "str?"}


def detects(raw: dict) -> bool:
    return raw.get("model_type") in MODEL_TYPES


# -- config.json checks -----------------------------------------------------------------------------------------
def check(d: dict, path: Path, clip: dict | None, clip_path: Path) -> None:
    """Refuse a config.json and its CLIP config with any wrong type, non-finite or out-of-range value or
    inconsistency, listing every problem in one message."""
    clip = clip if isinstance(clip, dict) else {}
    problems = section_problems(d, TOP, "")
    vision, text = clip.get("vision_config") or {}, clip.get("text_config") or {}
    for section, schema, name in ((vision, CLIP_VISION, "vision_config"), (text, CLIP_TEXT, "text_config")):
        if not isinstance(section, dict):
            problems.append(f"{clip_path}: {name} must be an object")
        else:
            problems += [f"{clip_path}: {p}" for p in section_problems(section, schema, f"{name}.")]
    if not problems:
        where = {"vision": f"{clip_path}: vision_config.", "decoder": "", "text": f"{clip_path}: text_config."}
        problems = consistency(vision, d, text, {k: d.get(k) for k in ("bos_token_id", "eos_token_id")
                                                 if d.get(k) is not None}, where)
        problems += tg_keys.problems(d, vision, "", d.get("feature_mask", True), d.get("detail_perceiver", True))
    if problems:
        raise TgedgeError(f"{path}: {'; '.join(problems)}")


# -- conversion -------------------------------------------------------------------------------------------------
def model_config(d: dict, clip: dict, with_mask: bool, with_perceiver: bool) -> ModelConfig:
    """`clip` is the CLIPModel config.json (vision_config and text_config) from `--clip DIR`."""
    model_type = d["model_type"]
    family = MODEL_TYPES[model_type]
    projector_type = d.get("mm_projector_type", "linear")
    if projector_type != "mlp2x_gelu":
        raise TgedgeError(f"unsupported mm_projector_type {projector_type!r} (only mlp2x_gelu)")
    select = d.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise TgedgeError(f"unknown mm_vision_select_feature {select!r}")
    merge = d.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise TgedgeError(f"unsupported mm_patch_merge_type {merge!r} (only flat)")
    vision = vision_config_from_clip(clip.get("vision_config") or {}, d.get("mm_vision_select_layer", -2),
                                     "default" if select == "patch" else "full")
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise TgedgeError(f"mm_hidden_size {d['mm_hidden_size']} does not match the CLIP vision width "
                          f"{vision.hidden_size}")
    decoder = decoder_config_from(d, family)
    projector = ProjectorConfig(vision.hidden_size, decoder.hidden_size, "gelu", True)
    text = fom = dp = None
    if with_mask or with_perceiver:
        text = text_config_from_clip(clip.get("text_config") or {})
        fom, dp = tg_keys.configs(d, vision, text, decoder.hidden_size, with_mask, with_perceiver)
    return ModelConfig(layout=NAME, vision=vision, projector=projector, decoder=decoder,
                       text_guide=text, feature_mask=fom, detail_perceiver=dp, image_token_index=None,
                       pad_to_square=d.get("image_aspect_ratio", "square") == "pad",
                       bos_token_id=d.get("bos_token_id"), eos_token_id=eos_list(d.get("eos_token_id")),
                       model_type=model_type)


# -- reading ----------------------------------------------------------------------------------------------------
CLIP_DIR = "a transformers CLIPModel directory with its config, tokenizer and image processor"


def clip_dir(raw: dict, clip: Path | None, ckpt: Path) -> Path:
    if clip is not None:  # the option named in what is wrong with it (not only a file under it)
        clip = Path(clip)
        if not clip.is_dir():
            raise TgedgeError(f"--clip {clip}: {'not a directory' if clip.exists() else 'not found'} "
                              f"(expected {CLIP_DIR})")
        if not (clip / "config.json").exists():
            raise TgedgeError(f"--clip {clip}: no config.json (expected {CLIP_DIR})")
        return clip
    named = raw.get("mm_vision_tower")
    if named and Path(named).is_dir():
        return Path(named)
    if (ckpt / "random_checkpoint.json").is_file() and (ckpt / "clip").is_dir():  # presets.MARKER, CLIP_SUBDIR
        return ckpt / "clip"  # a `tgedge checkpoint random` output keeps its CLIP directory inside
    raise TgedgeError(f"{ckpt}: original-layout checkpoint: pass --clip DIR ({CLIP_DIR}; mm_vision_tower is "
                      f"{named!r})")


def read(path: Path, raw: dict, clip: Path | None = None) -> Parts:
    weights = read_weights(path)
    clip = clip_dir(raw, clip, path)
    clip_raw = read_config_json(clip / "config.json")
    check(raw, path / "config.json", clip_raw, clip / "config.json")
    weights = weights.renamed(rename(weights, PREFIXES))
    with_mask = any(k.startswith("mm_cross_attn.") for k in weights)
    with_perceiver = any(k.startswith("mm_patch_encoder.") for k in weights)
    if raw["model_type"] in TG_MODEL_TYPES and not (with_mask or with_perceiver):
        raise TgedgeError(f"{path}: model_type {raw['model_type']} but no model.mm_cross_attn.* or "
                          "model.mm_patch_encoder.* tensors")
    present = {k.split(".")[0] for k in weights}
    if "vision_tower" not in present or ((with_mask or with_perceiver) and "text_tower" not in present):
        # Towers the checkpoint does not carry come from the CLIP directory.
        clip_w = read_weights(clip)
        clip_w = clip_w.renamed(rename(clip_w, CLIP_PREFIXES))
        weights = weights.merged(clip_w.only(lambda k: k.split(".")[0] not in present))
    cfg = model_config(raw, clip_raw, with_mask, with_perceiver)
    image = find_image_settings(clip, path)
    tokenizer = Tokenizer(path / "tokenizer.json")
    template = template_for_family(cfg.decoder.family, tokenizer.token_to_id("<|start_header_id|>") is not None)
    return Parts(cfg, weights, image, tokenizer, template, clip / "tokenizer.json")
