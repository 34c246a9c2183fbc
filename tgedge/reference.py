"""The PyTorch reference pipeline: preprocess -> text guide -> vision -> fusion -> prefill -> decode."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tgedge.generate import generate
from tgedge.preprocess import Inputs, Preprocessor
from tgedge.sampling import GenerationOptions, StopCriteria


@dataclass
class Answer:
    text: str
    tokens: list[int]
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
                "timings": {k: round(v, 6) for k, v in self.timings.items()}}


class TorchPipeline:
    def __init__(self, model, preprocessor: Preprocessor, context: int | None = None):
        self.model, self.pre = model.eval(), preprocessor
        self.context = context or model.cfg.decoder.max_position_embeddings

    @classmethod
    def from_checkpoint(cls, path: str | Path, clip: str | Path | None = None, context: int | None = None):
        from tgedge.checkpoint import load_model

        model, ckpt = load_model(path, clip)
        return cls(model, ckpt.preprocessor, context)

    ABLATIONS = ("fom", "dp", "both")

    @torch.no_grad()
    def ablate(self, which: str) -> "TorchPipeline":
        """Switch TG modules off at inference: `fom` zeroes TG-FOM's zero_layer, `dp` drops TG-DP's tokens."""
        from tgedge.errors import TgedgeError

        if which not in self.ABLATIONS:
            raise TgedgeError(f"unknown ablation {which!r} (choose from {', '.join(self.ABLATIONS)})")
        model = self.model
        if which in ("fom", "both"):
            if model.mm_cross_attn is None:
                raise TgedgeError("this model has no TG-FOM to ablate")
            model.mm_cross_attn.zero_layer.weight.zero_()
            model.mm_cross_attn.zero_layer.bias.zero_()
        if which in ("dp", "both"):
            if model.mm_patch_encoder is None:
                raise TgedgeError("this model has no TG-DP to ablate")
            model.without_tg(feature_mask=False, detail_perceiver=True)
            self.pre = self.pre.replace(num_image_tokens=model.cfg.num_image_tokens, detail_crops=False)
        return self

    @torch.no_grad()
    def embeddings(self, inputs: Inputs) -> torch.Tensor:
        """Prompt embeddings (1, T, D) with the image (and TG-DP detail) tokens in place."""
        t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
        image = self.model.encode_image(t(inputs.pixel_values), t(inputs.crops), t(inputs.guide_ids))
        return self.model.embed(t(inputs.input_ids), image)

    def options(self, **kw) -> GenerationOptions:
        kw.setdefault("eos_token_ids", self.pre.spec.eos_token_ids)
        kw.setdefault("stop_strings", self.pre.spec.template.stop_strings)
        return GenerationOptions(**kw)

    def answer(self, image, question: str, options: GenerationOptions | None = None, raw: bool = False,
               on_text: Callable[[str], None] | None = None) -> Answer:
        options = options or self.options()
        start = time.perf_counter()
        inputs = self.pre(image, question, raw)
        x = self.embeddings(inputs)
        encoded = time.perf_counter()
        decode = self.pre.tokenizer.decode
        stop = StopCriteria(options, decode)
        tokens: list[int] = []
        shown = ""

        def on_token(token: int) -> None:
            nonlocal shown
            tokens.append(token)
            if on_text is not None:  # stream the text as it grows, never past a stop string
                text = stop.clean(decode(tokens))
                if len(text) > len(shown) and text.startswith(shown):
                    on_text(text[len(shown):])
                    shown = text

        result = generate(self.model, x, options, self.context, stop, on_token=on_token)
        text = stop.clean(decode(result.tokens)).strip()
        timings = {"preprocess_encode_s": encoded - start, **result.timings}
        return Answer(text, result.tokens, int(inputs.input_ids.shape[1]), timings)
