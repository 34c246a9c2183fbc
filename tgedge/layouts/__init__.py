"""Checkpoint layouts: one module per layout, each owning its detection, its config conversion and its weight renames.

    hf             Hugging Face transformers LLaVA (`model_type: llava`), both key generations
    tgedge_layout  tgedge's own: the HF layout plus a `tg` section (the fusion family and the CLIP text tower)
    original       the LLaVA / TG-LLaVA repository (`llava_llama`, ...; `mm_*` keys), CLIP from a separate directory

A layout module has `NAME`, `MODEL_TYPES`, `detects(raw) -> bool` and `read(path, raw, clip) -> Parts` (its config
checked and converted, its weights renamed to tgedge's parameter names); what every layout reads the same way
(weights, image processor settings, chat template) is `common`. `tgedge.checkpoint.load_checkpoint` does
what is common to all: detection in `LAYOUTS` order, the checks on the result, the preprocessing spec.
"""

from __future__ import annotations

from pathlib import Path

from tgedge.errors import TgedgeError
import tgedge.layouts.hf as hf
import tgedge.layouts.original as original
import tgedge.layouts.tgedge_layout as tgedge_layout
from tgedge.layouts.common import Parts, rename

__all__ = ["IGNORED", "LAYOUTS", "Parts", "layout_of", "rename"]

# Detection order: tgedge's layout before plain HF (both are `model_type: llava`).
LAYOUTS = (tgedge_layout, hf, original)

# Tensors a layout's checkpoints may hold that the model does not use (regular expressions over tgedge names).
IGNORED = tuple(p for layout in LAYOUTS for p in getattr(layout, "IGNORED", ()))


def layout_of(raw: dict, path: Path):
    """The layout module of a checkpoint's config.json."""
    for layout in LAYOUTS:
        if layout.detects(raw):
            return layout
    known = ", ".join(dict.fromkeys(t for layout in LAYOUTS for t in layout.MODEL_TYPES))
    raise TgedgeError(f"{path}: unknown model_type {raw.get('model_type')!r} (supported: {known})")
