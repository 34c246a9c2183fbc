"""Checkpoint IO: read the three layouts into tgedge's parameter names, save tgedge's own layout (c).

Weights come from safetensors (single file or sharded with an index); a `.bin` is read only with
`torch.load(weights_only=True)`. Nothing in a checkpoint is executed; a chat template is rendered in a
Jinja sandbox. Missing, unexpected and mis-shaped tensors are collected and reported in one error; so are
config.json problems (types, ranges, consistency) and non-finite weights. Shard names in an index file must
stay inside the checkpoint directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tgedge import config as C
from tgedge.errors import TgedgeError
from tgedge.fileio import atomic_dir, inside, usual_file_mode
from tgedge.preprocess import IMAGE_PLACEHOLDER_ID, ImageSettings, Preprocessor, PreprocessSpec, Tokenizer
from tgedge.prompt import PromptTemplate, template_for_family
from tgedge.weights import LazyWeights

log = logging.getLogger("tgedge")

# (checkpoint prefix -> tgedge prefix), first match wins; both transformers key generations.
HF_PREFIXES = [
    ("model.vision_tower.vision_model.", "vision_tower."), ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."), ("vision_tower.", "vision_tower."),
    ("model.language_model.", "language_model."), ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."), ("multi_modal_projector.", "multi_modal_projector."),
    ("text_tower.text_model.", "text_tower."), ("text_tower.", "text_tower."),
    ("mm_cross_attn.", "mm_cross_attn."), ("mm_patch_encoder.", "mm_patch_encoder."),
    ("mm_gated_fusion.", "mm_gated_fusion."),
]
ORIGINAL_PREFIXES = [
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
    ("model.text_tower.text_tower.text_model.", "text_tower."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.mm_cross_attn.", "mm_cross_attn."), ("model.mm_patch_encoder.", "mm_patch_encoder."),
    ("model.", "language_model."), ("lm_head.", "lm_head."),
]
CLIP_PREFIXES = [("vision_model.", "vision_tower."), ("text_model.", "text_tower.")]

# Tensors a checkpoint may hold that the model does not use: buffers, the Q-Former's unused BERT text
# path and LM head, CLIP's projection heads.
IGNORED = re.compile("|".join([
    r".*position_ids$", r".*rotary_emb\.inv_freq$", r"visual_projection\..*", r"text_projection\..*", r"logit_scale",
    r"mm_cross_attn\.Qformer\.cls\..*", r"mm_cross_attn\.Qformer\.bert\.embeddings\.(word|position)_embeddings\..*",
    r"mm_cross_attn\.Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",
]))


def _rename(keys, prefixes) -> dict[str, str]:
    out = {}
    for k in keys:
        for old, new in prefixes:
            if k.startswith(old):
                out[k] = new + k[len(old):]
                break
        else:
            out[k] = k  # left as is: reported as unexpected unless ignored
    return out


def read_weights(directory: Path) -> LazyWeights:
    """All tensors of a checkpoint directory, read when asked (float32 where floating point): safetensors through
    their memory map, one tensor at a time; a pickled `.bin` (weights only) has to be loaded whole."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = shard_files(index)
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        return LazyWeights.from_safetensors([inside(directory, f, f"{index} weight_map") for f in files])
    else:
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if not bins:
            raise TgedgeError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")
        for f in bins:
            try:  # weights_only: a pickle may hold tensors but never code
                tensors.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:
                raise TgedgeError(f"{f}: cannot load with torch.load(weights_only=True) ({e})") from None
    return LazyWeights.from_tensors(tensors)


def shard_files(index: Path) -> list[str]:
    """The shard files a `*.safetensors.index.json` names (checked: a weight_map of names to file names)."""
    weight_map = C.read_config_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise TgedgeError(f"{index}: weight_map must be an object of tensor names to shard file names")
    files = sorted(set(weight_map.values()))
    for f in files:
        inside(index.parent, f, f"{index} weight_map")
    return files


def non_finite(weights: LazyWeights) -> list[str]:
    """Names of floating-point tensors holding NaN or inf (buffers the model ignores excepted), reading one
    tensor at a time as stored."""
    bad = []
    for k in weights:
        if IGNORED.fullmatch(k):
            continue
        v = weights.raw(k)
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad.append(k)
    return sorted(bad)


@dataclass
class Checkpoint:
    path: Path
    config: C.ModelConfig
    weights: LazyWeights  # tgedge names, read when asked
    preprocessor: Preprocessor
    raw_config: dict


def _find_image_settings(*dirs: Path) -> ImageSettings:
    for d in dirs:
        if (d / "preprocessor_config.json").exists():
            path = d / "preprocessor_config.json"
            return ImageSettings.from_processor_config(C.read_config_json(path), path)
        if (d / "processor_config.json").exists():
            path = d / "processor_config.json"
            proc = C.read_config_json(path)
            if "image_processor" in proc:
                return ImageSettings.from_processor_config(proc["image_processor"], f"{path} image_processor")
    raise TgedgeError(f"{dirs[0]}: no preprocessor_config.json (CLIP image processor settings)")


def _find_chat_template(d: Path) -> str | None:
    if (d / "chat_template.jinja").exists():
        try:
            return (d / "chat_template.jinja").read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise TgedgeError(f"{d / 'chat_template.jinja'}: not UTF-8 text (at byte {e.start})") from None
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        if (d / name).exists():
            t = C.read_config_json(d / name).get("chat_template")
            if isinstance(t, str):
                return t
    return None


def _eos_ids(d: Path, cfg: C.ModelConfig) -> list[int]:
    if (d / "generation_config.json").exists():
        eos = C.read_config_json(d / "generation_config.json").get("eos_token_id")
        if eos is not None:
            return C._eos_list(eos)
    return list(cfg.eos_token_id)


def _clip_dir(raw: dict, clip: Path | None, ckpt: Path) -> Path:
    if clip is not None:
        return clip
    named = raw.get("mm_vision_tower")
    if named and Path(named).is_dir():
        return Path(named)
    raise TgedgeError(f"{ckpt}: original-layout checkpoint: pass --clip DIR (a transformers CLIPModel directory "
                      f"with its config, tokenizer and image processor; mm_vision_tower is {named!r})")


def load_checkpoint(path: str | Path, clip: str | Path | None = None) -> Checkpoint:
    from tgedge import resolve_checkpoint

    path = resolve_checkpoint(path)
    if not path.is_dir():
        raise TgedgeError(f"{path}: checkpoint directory not found")
    raw = C.read_config_json(path / "config.json")
    layout = C.detect_layout(raw, path)
    if layout != C.ORIGINAL_LAYOUT:
        C.check_config_json(raw, path / "config.json")
    weights = read_weights(path)
    guide_tok_path = None
    if layout == C.ORIGINAL_LAYOUT:
        clip_dir = _clip_dir(raw, Path(clip) if clip else None, path)
        clip_raw = C.read_config_json(clip_dir / "config.json")
        C.check_config_json(raw, path / "config.json", clip_raw, clip_dir / "config.json")
        weights = weights.renamed(_rename(weights, ORIGINAL_PREFIXES))
        with_mask = any(k.startswith("mm_cross_attn.") for k in weights)
        with_perceiver = any(k.startswith("mm_patch_encoder.") for k in weights)
        if raw["model_type"] in C.TG_MODEL_TYPES and not (with_mask or with_perceiver):
            raise TgedgeError(f"{path}: model_type {raw['model_type']} but no model.mm_cross_attn.* or "
                              "model.mm_patch_encoder.* tensors")
        present = {k.split(".")[0] for k in weights}
        if "vision_tower" not in present or ((with_mask or with_perceiver) and "text_tower" not in present):
            # Towers the checkpoint does not carry come from the CLIP directory.
            clip_w = read_weights(clip_dir)
            clip_w = clip_w.renamed(_rename(clip_w, CLIP_PREFIXES))
            weights = weights.merged(clip_w.only(lambda k: k.split(".")[0] not in present))
        cfg = C.original_model_config(raw, clip_raw, with_mask, with_perceiver)
        image = _find_image_settings(clip_dir, path)
        tokenizer = Tokenizer(path / "tokenizer.json")
        template = template_for_family(cfg.decoder.family, tokenizer.token_to_id("<|start_header_id|>") is not None)
        guide_tok_path = clip_dir / "tokenizer.json"
    else:
        weights = weights.renamed(_rename(weights, HF_PREFIXES))
        cfg = C.hf_model_config(raw, layout)
        image = _find_image_settings(path)
        tokenizer = Tokenizer(path / "tokenizer.json")
        jinja = _find_chat_template(path)
        template = PromptTemplate("jinja", jinja) if jinja else PromptTemplate("llava")
        if layout == C.TGEDGE_LAYOUT:
            guide_tok_path = path / "text_guide" / "tokenizer.json"
    if not cfg.has_tg:
        log.warning("%s: no TG-LLaVA weights: running as plain LLaVA", path)
        weights = weights.only(lambda k: not k.startswith("text_tower."))
        guide_tok_path = None
    bad = non_finite(weights)
    if bad:
        raise TgedgeError(f"{path}: non-finite weights (NaN or inf) in {len(bad)} tensor(s): {', '.join(bad[:8])}"
                          f"{' ...' if len(bad) > 8 else ''}")
    if tokenizer.vocab_size > cfg.decoder.vocab_size:
        raise TgedgeError(f"{tokenizer.path}: {tokenizer.vocab_size} tokens, more than the decoder's vocab_size "
                          f"{cfg.decoder.vocab_size} in config.json")
    if cfg.image_token_index is not None and tokenizer.token_to_id("<image>") != cfg.image_token_index:
        raise TgedgeError(f"{path}: image_token_index {cfg.image_token_index} is not the tokenizer's <image> id "
                          f"({tokenizer.token_to_id('<image>')})")
    spec = PreprocessSpec(image=image, template=template, num_image_tokens=cfg.num_image_tokens,
                          image_token_id=IMAGE_PLACEHOLDER_ID if cfg.image_token_index is None else cfg.image_token_index,
                          pad_to_square=cfg.pad_to_square, detail_crops=cfg.detail_perceiver is not None,
                          text_guide_length=cfg.text_guide.max_position_embeddings if cfg.has_tg else 0,
                          eos_token_ids=_eos_ids(path, cfg))
    guide = Tokenizer(guide_tok_path) if guide_tok_path else None
    return Checkpoint(path, cfg, weights, Preprocessor(spec, tokenizer, guide), raw)


def load_state(model: torch.nn.Module, weights: LazyWeights, source: Path, copy: bool = True) -> None:
    """Strict load with every problem in one error: missing, unexpected and mis-shaped tensors; then one tensor
    at a time into the model (never a second copy of the whole model)."""
    expected = model.state_dict()
    tied = getattr(model, "cfg", None) is not None and model.cfg.decoder.tie_word_embeddings
    missing = sorted(k for k in expected if k not in weights)
    unexpected = sorted(k for k in weights if k not in expected and not IGNORED.fullmatch(k)
                        and not (tied and k == "lm_head.weight"))
    misshaped = sorted(f"{k} {weights.shape(k)} != {tuple(v.shape)}" for k, v in expected.items()
                       if k in weights and weights.shape(k) != tuple(v.shape))
    problems = [f"{label} ({len(items)}): {', '.join(items[:12])}{' ...' if len(items) > 12 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if items]
    if problems:
        raise TgedgeError(f"{source}: checkpoint does not match the model: " + "; ".join(problems))
    if not copy:  # a meta-device model: names and shapes checked, weights loaded later (materialize)
        return
    with torch.no_grad():
        for k, target in expected.items():
            target.copy_(weights[k])


def load_model(path: str | Path, clip: str | Path | None = None, device: str = "cpu"):
    """-> (TGLlava in eval mode, fp32, Checkpoint). `device="meta"`: the model without weights (nothing allocated),
    checked against the checkpoint's names and shapes; `materialize` then loads the parts a step needs."""
    ckpt = load_checkpoint(path, clip)
    return model_of(ckpt, device), ckpt


def model_of(ckpt: Checkpoint, device: str = "cpu"):
    """The TGLlava of a loaded checkpoint (`load_model` without reading the checkpoint again: a caller that looked
    at its config first)."""
    from tgedge.model import TGLlava

    meta = device == "meta"
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = TGLlava(ckpt.config)
    load_state(model, ckpt.weights, ckpt.path, copy=not meta)
    return model.eval()


def materialize(model: torch.nn.Module, weights: LazyWeights, prefixes: tuple[str, ...]) -> None:
    """Load the parameters under `prefixes` (module paths) of a meta-device model; buffers are recomputed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefixes):
                _set_tensor(model, name, torch.nn.Parameter(weights[name], requires_grad=False))
    if any(p.startswith("language_model") for p in prefixes):
        from tgedge.model.decoder import rope_inv_freq

        dec = model.language_model
        dec.inv_freq = rope_inv_freq(dec.cfg)


def release(model: torch.nn.Module, prefixes: tuple[str, ...]) -> None:
    """Drop the parameters under `prefixes` back to the meta device (their memory is freed)."""
    for name, p in model.named_parameters():
        if name.startswith(prefixes) and not p.is_meta:
            _set_tensor(model, name, torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))


def _set_tensor(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, value)


def save_checkpoint(model, preprocessor: Preprocessor, out: str | Path, chat_template: str | None = None,
                    force: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write tgedge's own layout (c): HF LLaVA layout + `tg` config section + TG (or gated fusion) weights + CLIP
    text tower.

    `out` follows tgedge's output rule (tgedge.fileio): new, empty or an earlier checkpoint it wrote, unless
    `force`; never the directory the tokenizers are read from. `extra_files` (name -> text, e.g. a training
    log) are written inside the same atomic replacement."""
    from safetensors.torch import save_file

    cfg: C.ModelConfig = model.cfg
    out = Path(out)
    sources = [preprocessor.tokenizer.path] + ([preprocessor.guide_tokenizer.path] if preprocessor.guide_tokenizer
                                               else [])
    with atomic_dir(out, kind="checkpoint", inputs=sources, force=force) as tmp:
        for name, content in (extra_files or {}).items():
            inside(tmp, name, f"save_checkpoint extra_files {name!r}").write_text(content, encoding="utf-8")
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        # One metadata key: safetensors writes the metadata map in hash order, so two keys would give
        # files that differ from run to run with identical weights. The layout is told by config.json.
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        usual_file_mode(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config_json(cfg), indent=2) + "\n")
        spec = preprocessor.spec
        proc = image_processor_json(spec.image)
        (tmp / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
        shutil.copyfile(preprocessor.tokenizer.path, tmp / "tokenizer.json")
        template = chat_template or spec.template.jinja
        if template is None and spec.template.name != "llava":
            template = builtin_as_jinja(spec.template.name)
        if template is not None:
            (tmp / "chat_template.jinja").write_text(template)
        if spec.eos_token_ids:
            (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": spec.eos_token_ids}) + "\n")
        if preprocessor.guide_tokenizer is not None:
            (tmp / "text_guide").mkdir()
            shutil.copyfile(preprocessor.guide_tokenizer.path, tmp / "text_guide" / "tokenizer.json")
    return out


def builtin_as_jinja(name: str) -> str:
    """A built-in template as a Jinja chat template (so a saved checkpoint keeps its prompt format)."""
    from tgedge.prompt import BUILTIN_TEMPLATES

    fmt = BUILTIN_TEMPLATES[name][0]
    head, tail = fmt.split("{user}")
    esc = lambda s: s.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'")  # noqa: E731
    return ("{%- for m in messages if m['role'] == 'user' -%}{{ '" + esc(head) + "<image>\\n' }}"
            "{%- for c in m['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}{%- endfor -%}"
            "{{ '" + esc(tail) + "' }}")


def image_processor_json(s: ImageSettings) -> dict:
    size = {"height": s.size_hw[0], "width": s.size_hw[1]} if s.size_hw else {"shortest_edge": s.shortest_edge}
    return {"image_processor_type": "CLIPImageProcessor", "size": size,
            "crop_size": {"height": s.crop_hw[0], "width": s.crop_hw[1]}, "resample": s.resample,
            "do_resize": s.do_resize, "do_center_crop": s.do_center_crop, "do_rescale": s.do_rescale,
            "rescale_factor": s.rescale_factor, "do_normalize": s.do_normalize, "image_mean": list(s.mean),
            "image_std": list(s.std), "do_convert_rgb": s.do_convert_rgb}


def config_json(cfg: C.ModelConfig) -> dict:
    v, d = cfg.vision, cfg.decoder
    text_config = {"model_type": d.family, "vocab_size": d.vocab_size, "hidden_size": d.hidden_size,
                   "intermediate_size": d.intermediate_size, "num_hidden_layers": d.num_layers,
                   "num_attention_heads": d.num_heads, "num_key_value_heads": d.num_kv_heads, "head_dim": d.head_dim,
                   "rms_norm_eps": d.rms_norm_eps, "rope_theta": d.rope_theta, "rope_scaling": d.rope_scaling,
                   "max_position_embeddings": d.max_position_embeddings, "attention_bias": d.attention_bias,
                   "tie_word_embeddings": d.tie_word_embeddings, "hidden_act": d.hidden_act,
                   "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id or None}
    out = {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": cfg.image_token_index,  # null: no image token in the vocabulary (original layout)
        "vision_feature_layer": v.select_layer, "vision_feature_select_strategy": v.select_strategy,
        "projector_hidden_act": cfg.projector.hidden_act, "multimodal_projector_bias": cfg.projector.bias,
        "tie_word_embeddings": d.tie_word_embeddings,
        "image_aspect_ratio": "pad" if cfg.pad_to_square else "square",
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                          "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
                          "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
                          "hidden_act": v.hidden_act},
        "text_config": text_config,
    }
    if cfg.has_tg:
        t, fom, dp = cfg.text_guide, cfg.feature_mask, cfg.detail_perceiver
        tg = {"feature_mask": fom is not None, "detail_perceiver": dp is not None,
              "text_config": {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                              "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                              "num_attention_heads": t.num_heads, "max_position_embeddings": t.max_position_embeddings,
                              "layer_norm_eps": t.layer_norm_eps, "hidden_act": t.hidden_act,
                              "eos_token_id": t.eos_token_id}}
        if fom is not None:
            tg.update(tg_fom_num_layers=fom.num_layers, tg_fom_num_heads=fom.num_heads,
                      tg_fom_intermediate_size=fom.intermediate_size)
        if dp is not None:
            tg.update(tg_dp_num_latents=dp.num_latents, tg_dp_depth=dp.depth, tg_dp_num_heads=dp.num_heads,
                      tg_dp_head_dim=dp.head_dim, tg_dp_num_kv_heads=dp.num_kv_heads, tg_dp_rms_norm_eps=dp.rms_norm_eps)
        if cfg.gated_fusion is not None:
            tg["tg_fusion"] = C.gated_config_json(cfg.gated_fusion)
        out["tg"] = tg
    return out
