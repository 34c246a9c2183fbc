"""A checkpoint's activation statistics on one image and question: `tgedge checkpoint stats`.

What decides how hard a model is to deploy is not its architecture but its numbers: how far activations range
(fp16, int8 scales), whether a few channels dominate the normalised residual stream (per-tensor int8 ranges,
LLM.int8() / SmoothQuant), how far the residual stream grows with depth (fp32 accumulation error), and how sharp the
next-token distributions are (near-ties flip argmaxes under quantisation noise). This runs the PyTorch reference
once, through the same stages every pipeline uses, with forward hooks on the vision tower's and the decoder's layers,
and reports those numbers, so that random presets (docs/SCALE.md) and real checkpoints can be compared.

With `sensitivity`, also how much the answer moves when the decoder's weights are rounded to 8 bits per output
channel (round-to-nearest, in torch): the greedy tokens teacher-forced again, top-1 agreement and min cosine of the
logits. A trained checkpoint keeps its argmaxes under this (it is stored in bf16, and W8 round-to-nearest is close to
lossless on trained LLMs); a random init that does not is chaotic, and no quantiser can be judged on it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tgedge.generate import generate

DEFAULT_PROMPT = "What is in the picture?"
DEFAULT_TOKENS = 16  # greedy positions the top-1 quantiles are taken over
QUANTILES = (0.1, 0.5, 0.9)
OUTLIER_FACTOR = 8.0  # a channel whose rms is this many times the median is counted as an outlier channel


def summary(x) -> dict:
    x = torch.as_tensor(x).detach().double()
    return {"std": float(x.std()), "max": float(x.abs().max())}


@dataclass
class ChannelRms:
    """Per-channel rms of one norm's output over every token (and view) it saw."""
    sum_sq: torch.Tensor | None = None
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1, x.shape[-1])
        s = (x * x).sum(0)
        self.sum_sq = s if self.sum_sq is None else self.sum_sq + s
        self.count += x.shape[0]

    def rms(self) -> torch.Tensor:
        return (self.sum_sq / self.count).sqrt()

    def ratio(self) -> float:
        r = self.rms()
        return float(r.max() / r.median())


@dataclass
class TowerStats:
    """One transformer stack: the residual stream after each layer, and its norms' outputs (the Linear inputs)."""
    residual: list[dict] = field(default_factory=list)
    normed: dict[str, ChannelRms] = field(default_factory=dict)

    def to_dict(self) -> dict:
        ratios = [c.ratio() for c in self.normed.values()]
        hits: dict[int, int] = {}
        for c in self.normed.values():
            r = c.rms()
            for i in torch.nonzero(r > OUTLIER_FACTOR * r.median()).flatten().tolist():
                hits[i] = hits.get(i, 0) + 1
        return {"layers": len(self.residual),
                "residual_std": [round(r["std"], 6) for r in self.residual],
                "residual_max": [round(r["max"], 6) for r in self.residual],
                "outlier_ratio": float(np.median(ratios)) if ratios else None,
                "outlier_ratio_max": max(ratios) if ratios else None,
                # channels over OUTLIER_FACTOR x the median at more than half of the norms
                "outlier_channels": sorted(i for i, n in hits.items() if n > len(self.normed) / 2)}


class Recorder:
    """Forward hooks on the vision tower's and the decoder's layers; `decoder_on` limits the decoder's to prefill."""

    def __init__(self, model):
        self.towers = {"vision": TowerStats(), "decoder": TowerStats()}
        self.decoder_on = True
        self.handles = []
        vision = model.vision_tower.encoder.layers[:model.cfg.vision.layers_needed]
        for i, layer in enumerate(vision):
            self._hook("vision", i, layer, {"layer_norm1": layer.self_attn.q_proj, "layer_norm2": layer.mlp.fc1})
        for i, layer in enumerate(model.language_model.layers):
            self._hook("decoder", i, layer, {"input_layernorm": layer.self_attn.q_proj,
                                             "post_attention_layernorm": layer.mlp.gate_proj})

    def _hook(self, tower: str, i: int, layer, readers: dict) -> None:
        stats = self.towers[tower]

        def on():
            return tower != "decoder" or self.decoder_on

        def residual(module, inputs, output):
            if on():
                stats.residual.append(summary(output))

        def reader(name):
            rms = stats.normed.setdefault(f"{i}.{name}", ChannelRms())
            return lambda module, inputs: rms.add(inputs[0]) if on() else None

        self.handles.append(layer.register_forward_hook(residual))
        self.handles += [linear.register_forward_pre_hook(reader(name)) for name, linear in readers.items()]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _LogitsRecorder:
    """A pipeline's decode steps, passed through, with the logits of each step kept (for generate)."""

    def __init__(self, pipe, recorder: Recorder):
        self.pipe, self.recorder, self.logits = pipe, recorder, []

    def setup_cache(self, n):
        self.pipe.setup_cache(n)

    def clear_cache(self):
        self.pipe.clear_cache()

    def prefill(self, x):
        out = self.pipe.prefill(x)
        self.recorder.decoder_on = False  # the decoder's statistics are the prompt's
        self.logits.append(np.asarray(out, np.float64))
        return out

    def decode_one_token(self, token, pos):
        out = self.pipe.decode_one_token(token, pos)
        self.logits.append(np.asarray(out, np.float64))
        return out


def _top1(logits: np.ndarray) -> float:
    p = np.exp(logits - logits.max())
    return float(p.max() / p.sum())


def _round8(w: torch.Tensor) -> torch.Tensor:
    step = w.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
    return torch.round(w / step) * step


@torch.no_grad()
def w8_sensitivity(model, pipe, x, tokens: list[int]) -> dict:
    """Teacher-forced logits on `tokens` before and after 8-bit per-output-channel rounding of every decoder Linear
    weight (restored afterwards, bit for bit): top-1 agreement and the logits' min cosine."""
    from tgedge.generate import forced_logits

    ref = forced_logits(pipe, x, tokens)
    linears = [m for m in model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    if not model.cfg.decoder.tie_word_embeddings:
        linears.append(model.lm_head)
    saved = [m.weight.data for m in linears]
    try:
        for m in linears:
            m.weight.data = _round8(m.weight.data)
        out = forced_logits(pipe, x, tokens)
    finally:
        for m, w in zip(linears, saved):
            m.weight.data = w
    a, b = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"positions": len(tokens), "top1": float(np.mean(a.argmax(-1) == b.argmax(-1))),
            "min_cosine": float(cos.min())}


def _default_image(folder: Path) -> Path:
    from tgedge.demo import shapes_image

    return shapes_image(folder / "shapes.png")


@torch.no_grad()
def checkpoint_stats(path: str | Path, clip: str | Path | None = None, image: str | Path | None = None,
                     prompt: str = DEFAULT_PROMPT, tokens: int = DEFAULT_TOKENS, sensitivity: bool = False) -> dict:
    """Load a checkpoint (fp32), run the reference once on an image and question, -> the statistics as a dict
    (with `sensitivity`, also `w8_sensitivity` on the greedy tokens)."""
    from tgedge.checkpoint import load_model
    from tgedge.reference import TorchPipeline

    model, ckpt = load_model(path, clip)
    pipe = TorchPipeline(model, ckpt.preprocessor)
    stages: dict[str, dict] = {}
    run_stage = pipe.run_stage

    def recording_stage(name, feed):
        out = run_stage(name, feed)
        if name not in stages:  # a generated token's embedding is not the prompt's
            stages[name] = {k: summary(v) for k, v in out.items()}
        return out

    pipe.run_stage = recording_stage
    recorder = Recorder(model)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inputs = pipe.pre(image or _default_image(Path(tmp)), prompt)
        x = pipe.embeddings(inputs)
        steps = _LogitsRecorder(pipe, recorder)
        options = pipe.options(max_new_tokens=tokens, eos_token_ids=[], stop_strings=[])  # every position counts
        result = generate(steps, x, options, pipe.context)
    finally:
        recorder.close()
        pipe.run_stage = run_stage
    last, top1 = steps.logits[0], np.array([_top1(row) for row in steps.logits])
    extra = {"w8_sensitivity": w8_sensitivity(model, pipe, x, result.tokens)} if sensitivity else {}
    return {"checkpoint": str(path), "image": str(image) if image else "built-in shapes picture", "prompt": prompt,
            "prompt_tokens": int(inputs.input_ids.shape[1]), "generated": result.tokens,
            "stages": stages, "vision": recorder.towers["vision"].to_dict(),
            "decoder": recorder.towers["decoder"].to_dict(),
            "logits": {"last_std": float(last.std()), "last_max": float(np.abs(last).max()),
                       "std_mean": float(np.mean([row.std() for row in steps.logits]))},
            "top1": {"positions": len(top1), **{f"p{round(q * 100)}": float(np.quantile(top1, q))
                                                for q in QUANTILES}},
            "greedy": path_shape(result.tokens), **extra}


def path_shape(tokens: list[int]) -> dict:
    """How varied a greedy path is: distinct tokens and the longest run of one token. A path that repeats one
    token makes top-1 agreement one coin per question (every position follows the same attractor), so a
    quantiser's figures on it say little; a trained model's answer is varied."""
    run = best = 0
    for i, t in enumerate(tokens):
        run = run + 1 if i and t == tokens[i - 1] else 1
        best = max(best, run)
    return {"tokens": len(tokens), "distinct": len(set(tokens)), "longest_repeat": best}


def format_stats(s: dict) -> str:
    """The statistics as a short table (what `tgedge checkpoint stats` prints without --json)."""
    lines = [f"{s['checkpoint']}: {s['prompt_tokens']} prompt tokens ({s['image']}, {s['prompt']!r}), "
             f"{s['top1']['positions']} greedy positions", f"{'stage':<12}{'output':<16}{'std':>10}{'max|x|':>10}"]
    for stage, outs in s["stages"].items():
        lines += [f"{stage:<12}{name:<16}{v['std']:>10.4g}{v['max']:>10.4g}" for name, v in outs.items()]
    lines.append(f"{'tower':<9}{'layers':>7}{'residual std first/mid/last':>30}{'max':>9}{'outlier ratio':>15}"
                 f"{'(max)':>8}  outlier channels")
    for tower in ("vision", "decoder"):
        t = s[tower]
        if not t["layers"]:
            continue
        r = t["residual_std"]
        std = f"{r[0]:.3g} / {r[len(r) // 2]:.3g} / {r[-1]:.3g}"
        lines.append(f"{tower:<9}{t['layers']:>7}{std:>30}{max(t['residual_max']):>9.4g}{t['outlier_ratio']:>15.3g}"
                     f"{t['outlier_ratio_max']:>8.3g}  {t['outlier_channels'] or '-'}")
    lg, q = s["logits"], s["top1"]
    lines.append(f"logits: last-position std {lg['last_std']:.3g} (max |x| {lg['last_max']:.3g}), mean std over "
                 f"positions {lg['std_mean']:.3g}; top-1 probability p10 / p50 / p90: "
                 f"{q['p10']:.3g} / {q['p50']:.3g} / {q['p90']:.3g}")
    g = s["greedy"]
    lines.append(f"greedy path: {g['distinct']} distinct of {g['tokens']} tokens, longest run of one token "
                 f"{g['longest_repeat']}" + ("  (degenerate: one attractor, top-1 agreement is one coin per "
                                             "question)" if g["distinct"] <= max(2, g["tokens"] // 4) else ""))
    if "w8_sensitivity" in s:
        w = s["w8_sensitivity"]
        lines.append(f"decoder weights rounded to 8 bits per channel: top-1 agreement {w['top1']:.3f} over "
                     f"{w['positions']} positions, min logits cosine {w['min_cosine']:.5f}")
    return "\n".join(lines)
