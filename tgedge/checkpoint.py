"""Checkpoint IO: load a checkpoint in any layout into tgedge's parameter names, save tgedge's own layout (c).

Each layout (detection, config checks and conversion, weight renames) is one module of `tgedge.layouts`; here is
what is common: the checks on what a layout read, the preprocessing spec (from the fusion family), the model.

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
from tgedge import layouts
from tgedge.contract import preprocess_needs
from tgedge.errors import TgedgeError, absent
from tgedge.fileio import atomic_dir, inside, usual_file_mode
from tgedge.layouts.common import read_weights, shard_files  # noqa: F401  (re-exported: common reading)
from tgedge.layouts.tgedge_layout import config_json
from tgedge.preprocess import IMAGE_PLACEHOLDER_ID, ImageSettings, Preprocessor, PreprocessSpec, Tokenizer
from tgedge.weights import LazyWeights

log = logging.getLogger("tgedge")

# Tensors a checkpoint may hold that the model does not use: buffers, CLIP's projection heads, and what a layout's
# checkpoints carry besides (TG-LLaVA's unused Q-Former parts).
IGNORED = re.compile("|".join([
    r".*position_ids$", r".*rotary_emb\.inv_freq$", r"visual_projection\..*", r"text_projection\..*", r"logit_scale",
    *layouts.IGNORED,
]))


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


def _eos_ids(d: Path, cfg: C.ModelConfig) -> list[int]:
    if (d / "generation_config.json").exists():
        eos = C.read_config_json(d / "generation_config.json").get("eos_token_id")
        if eos is not None:
            return C.eos_list(eos)
    return list(cfg.eos_token_id)


def load_checkpoint(path: str | Path, clip: str | Path | None = None) -> Checkpoint:
    from tgedge import resolve_checkpoint

    path = resolve_checkpoint(path)
    if not path.is_dir():
        raise TgedgeError(f"{path}: {absent(path, 'checkpoint directory')}")
    if (path / "manifest.json").exists() and not (path / "config.json").exists():
        raise TgedgeError(f"{path}: is an export directory (manifest.json), not a checkpoint: run it with tgedge run "
                          "(or validate, bench); export works from the checkpoint it was made from")
    raw = C.read_config_json(path / "config.json")
    layout = layouts.layout_of(raw, path)
    if clip and not getattr(layout, "USES_CLIP", False):  # it would be ignored: the towers are in the checkpoint
        raise TgedgeError(f"--clip {clip}: {path} is a {layout.NAME} checkpoint with its vision tower inside; --clip "
                          "is for original-layout (TG-LLaVA repository) checkpoints only: leave it out")
    try:
        parts = layout.read(path, raw, Path(clip) if clip else None)
    except TgedgeError as e:  # a config check that does not know its file: it is this config.json's
        named = [str(path)] + ([str(clip)] if clip else [])
        if any(n in str(e) for n in named):
            raise
        raise TgedgeError(f"{path / 'config.json'}: {e}") from None
    cfg, weights, guide_tok_path = parts.config, parts.weights, parts.guide_tokenizer
    if not cfg.has_tg:
        log.warning("%s: no TG-LLaVA weights: running as plain LLaVA", path)
        weights = weights.only(lambda k: not k.startswith("text_tower."))
        guide_tok_path = None
    bad = non_finite(weights)
    if bad:
        raise TgedgeError(f"{path}: non-finite weights (NaN or inf) in {len(bad)} tensor(s): {', '.join(bad[:8])}"
                          f"{' ...' if len(bad) > 8 else ''}")
    tokenizer = parts.tokenizer
    if tokenizer.vocab_size > cfg.decoder.vocab_size:
        raise TgedgeError(f"{tokenizer.path}: {tokenizer.vocab_size} tokens, more than the decoder's vocab_size "
                          f"{cfg.decoder.vocab_size} in config.json")
    if cfg.image_token_index is not None and tokenizer.token_to_id("<image>") != cfg.image_token_index:
        raise TgedgeError(f"{path}: image_token_index {cfg.image_token_index} is not the tokenizer's <image> id "
                          f"({tokenizer.token_to_id('<image>')})")
    # the family says what preprocessing it needs: image tokens, detail crops, the text guide's length
    spec = PreprocessSpec(image=parts.image, template=parts.template,
                          image_token_id=IMAGE_PLACEHOLDER_ID if cfg.image_token_index is None else cfg.image_token_index,
                          pad_to_square=cfg.pad_to_square, eos_token_ids=_eos_ids(path, cfg),
                          **preprocess_needs(cfg.to_dict()))
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


def load_model(path: str | Path, clip: str | Path | None = None, device: str = "cpu",
               dtype: torch.dtype | None = None):
    """-> (TGLlava in eval mode, fp32 unless `dtype`, Checkpoint). `device="meta"`: the model without weights (nothing
    allocated), checked against the checkpoint's names and shapes; `materialize` then loads the parts a step needs.
    `device="cuda"` (or any torch device) / `dtype`: the weights loaded straight there in that dtype."""
    ckpt = load_checkpoint(path, clip)
    return model_of(ckpt, device, dtype), ckpt


def model_of(ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype | None = None):
    """The TGLlava of a loaded checkpoint (`load_model` without reading the checkpoint again: a caller that looked
    at its config first)."""
    from tgedge.model import TGLlava

    meta = device == "meta"
    if device in ("cpu", "meta") and dtype in (None, torch.float32):  # as ever: built (and initialised) in fp32
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = TGLlava(ckpt.config)
        load_state(model, ckpt.weights, ckpt.path, copy=not meta)
        return model.eval()
    # elsewhere, or in another dtype: built without weights, given memory there in the dtype (never an fp32 copy, never
    # initialised: every parameter is then loaded), the rotary frequencies recomputed in fp32 as the export writes them
    with torch.device("meta"):
        model = TGLlava(ckpt.config).to(dtype or torch.float32)
    model.to_empty(device=device)
    load_state(model, ckpt.weights, ckpt.path)
    from tgedge.model.decoder import rope_inv_freq

    dec = model.language_model
    dec.inv_freq = rope_inv_freq(dec.cfg).to(device)
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
    """A built-in template as a Jinja chat template (so a saved checkpoint keeps its prompt format, every turn)."""
    from tgedge.prompt import BUILTIN_TEMPLATES

    start, user, assistant, opening, _ = BUILTIN_TEMPLATES[name]
    esc = lambda s: "'" + s.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'") + "'"  # noqa: E731
    u_head, u_tail = user.split("{}")
    a_head, a_tail = assistant.split("{}")
    text = "{%- for c in m['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
    return ("{{ " + esc(start) + " }}{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ " + esc(u_head) + " }}"
            "{%- for c in m['content'] if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}" + text
            + "{{ " + esc(u_tail) + " }}{%- elif m['role'] == 'assistant' -%}{{ " + esc(a_head) + " }}" + text
            + "{{ " + esc(a_tail) + " }}{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ " + esc(opening) + " }}{%- endif -%}")


def image_processor_json(s: ImageSettings) -> dict:
    size = {"height": s.size_hw[0], "width": s.size_hw[1]} if s.size_hw else {"shortest_edge": s.shortest_edge}
    return {"image_processor_type": "CLIPImageProcessor", "size": size,
            "crop_size": {"height": s.crop_hw[0], "width": s.crop_hw[1]}, "resample": s.resample,
            "do_resize": s.do_resize, "do_center_crop": s.do_center_crop, "do_rescale": s.do_rescale,
            "rescale_factor": s.rescale_factor, "do_normalize": s.do_normalize, "image_mean": list(s.mean),
            "image_std": list(s.std), "do_convert_rgb": s.do_convert_rgb}
