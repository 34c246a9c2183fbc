"""`tgedge validate`: an export on a runtime backend against the PyTorch fp32 reference, stage by stage.

Each stage's graph gets the reference's own inputs, so a stage's figures are its own drift, not its
predecessors': preprocess (ids and pixels from the export's preprocess.json), text_guide, vision, fusion,
embed, decoder (logits under teacher forcing on the reference's answer tokens), then end to end: greedy
answers and task accuracy. A policy (TOML) gives the limits; the report names the first stage out of budget.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from tgedge.errors import TgedgeError

log = logging.getLogger("tgedge")

STAGES = ("preprocess", "text_guide", "vision", "fusion", "embed", "decoder", "answers", "accuracy")
PRECISION_ORDER = ("fp32", "fp16", "int8w", "int8", "int4w")  # highest first
DEFAULT_POLICY = Path(__file__).parent / "policies" / "default.toml"
# limit key -> (figure it bounds, True when the figure must stay at or below the limit)
LIMITS = {"max_abs": ("max_abs", True), "max_rel": ("max_rel", True), "min_cosine": ("min_cosine", False),
          "min_top1": ("top1", False), "max_kl": ("kl_max", True), "min_exact_match": ("exact_match", False),
          "max_drop": ("drop_points", True)}


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TgedgeError(f"{path}: policy file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise TgedgeError(f"{path}: not valid TOML ({e})") from None


def load_policy(path: str | Path | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """The default policy, with a user file's keys laid over it; unknown precisions, stages or limits are errors."""
    policy = _toml(DEFAULT_POLICY)
    if path is None:
        return policy
    user = _toml(Path(path))
    for precision, stages in user.items():
        if precision not in PRECISION_ORDER or not isinstance(stages, dict):
            raise TgedgeError(f"{path}: unknown precision section [{precision}] (known: {', '.join(PRECISION_ORDER)})")
        for stage, limits in stages.items():
            if stage not in STAGES or not isinstance(limits, dict):
                raise TgedgeError(f"{path}: unknown stage [{precision}.{stage}] (known: {', '.join(STAGES)})")
            bad = [k for k in limits if k not in LIMITS]
            if bad:
                raise TgedgeError(f"{path}: [{precision}.{stage}] unknown limit(s) {', '.join(bad)} "
                                  f"(known: {', '.join(LIMITS)})")
            policy.setdefault(precision, {}).setdefault(stage, {}).update(limits)
    return policy


# -- figures ----------------------------------------------------------------------------------------------------
class Diff:
    """Running figures for one stage's tensors over all samples."""

    def __init__(self):
        self.max_abs, self.ref_max, self.abs_sum, self.count, self.min_cosine = 0.0, 0.0, 0.0, 0, 1.0

    def add(self, got, want) -> None:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if got.shape != want.shape:  # e.g. a different number of tokens: as far off as it gets
            self.max_abs, self.min_cosine, self.count = float("inf"), -1.0, self.count + 1
            return
        d = np.abs(got - want)
        self.max_abs = max(self.max_abs, float(d.max(initial=0.0)))
        self.ref_max = max(self.ref_max, float(np.abs(want).max(initial=0.0)))
        self.abs_sum, self.count = self.abs_sum + float(d.sum()), self.count + d.size
        denom = float(np.linalg.norm(got) * np.linalg.norm(want))
        cos = float((got * want).sum()) / denom if denom else float(np.array_equal(got, want))
        self.min_cosine = min(self.min_cosine, cos)

    def figures(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "mean_abs": self.abs_sum / max(self.count, 1),
                "max_rel": self.max_abs / self.ref_max if self.ref_max else self.max_abs, "min_cosine": self.min_cosine}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass
class StageResult:
    name: str
    precision: str
    figures: dict[str, float]
    limits: dict[str, float]
    breaches: list[str] = field(default_factory=list)

    def judge(self) -> "StageResult":
        for key, limit in self.limits.items():
            figure, upper = LIMITS[key]
            value = self.figures.get(figure)
            if value is None:
                continue
            if (value > limit) if upper else (value < limit):
                self.breaches.append(f"{figure} {value:.4g} {'>' if upper else '<'} {limit:g}")
        return self

    @property
    def passed(self) -> bool:
        return not self.breaches

    def to_dict(self) -> dict:
        figures = {k: (v if math.isfinite(v) else str(v)) for k, v in self.figures.items()}  # JSON has no inf
        return {"stage": self.name, "precision": self.precision, "passed": self.passed, "figures": figures,
                "limits": self.limits, "breaches": self.breaches}


@dataclass
class ValidationReport:
    export_dir: str
    reference: str
    backend: str
    samples: int
    stages: list[StageResult]
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.stages)

    @property
    def first_failure(self) -> StageResult | None:
        return next((s for s in self.stages if not s.passed), None)

    def summary(self) -> str:
        bad = self.first_failure
        if bad is None:
            return f"PASS: {len(self.stages)} stages within budget on {self.samples} samples ({self.backend})"
        return f"FAIL: first stage out of budget: {bad.name} ({bad.precision}): {'; '.join(bad.breaches)}"

    def to_dict(self) -> dict:
        bad = self.first_failure
        return {"passed": self.passed, "first_failure": bad.name if bad else None, "summary": self.summary(),
                "export_dir": self.export_dir, "reference": self.reference, "backend": self.backend,
                "samples": self.samples, "seconds": round(self.seconds, 3),
                "stages": {s.name: s.to_dict() for s in self.stages}}

    def to_junit(self) -> str:
        failures = sum(not s.passed for s in self.stages)
        suites = ET.Element("testsuites", name="tgedge validate", tests=str(len(self.stages)), failures=str(failures))
        suite = ET.SubElement(suites, "testsuite", name=f"tgedge validate {self.export_dir}",
                              tests=str(len(self.stages)), failures=str(failures), errors="0",
                              time=f"{self.seconds:.3f}")
        props = ET.SubElement(suite, "properties")
        for k in ("export_dir", "reference", "backend", "samples"):
            ET.SubElement(props, "property", name=k, value=str(getattr(self, k)))
        for s in self.stages:
            case = ET.SubElement(suite, "testcase", classname=f"tgedge.validate.{s.precision}", name=s.name)
            figures = ", ".join(f"{k}={v:.6g}" for k, v in s.figures.items())
            if not s.passed:
                ET.SubElement(case, "failure", message="; ".join(s.breaches), type="DriftOutOfBudget").text = figures
            else:
                ET.SubElement(case, "system-out").text = figures
        return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"

    def to_markdown(self) -> str:
        lines = [f"### tgedge validate: {'PASS' if self.passed else 'FAIL'}", "",
                 f"`{self.export_dir}` on `{self.backend}` against `{self.reference}`, {self.samples} samples.", "",
                 "| stage | precision | figures | limits | result |", "|---|---|---|---|---|"]
        for s in self.stages:
            figs = ", ".join(f"{k} {v:.4g}" for k, v in s.figures.items())
            lims = ", ".join(f"{k} {v:g}" for k, v in s.limits.items()) or "none"
            lines.append(f"| {s.name} | {s.precision} | {figs} | {lims} | "
                         f"{'pass' if s.passed else 'FAIL: ' + '; '.join(s.breaches)} |")
        return "\n".join(lines + ["", self.summary()]) + "\n"


# -- the comparison ---------------------------------------------------------------------------------------------
def _stage_precisions(manifest) -> dict[str, str]:
    graphs = {g: e.precision for g, e in manifest.graphs.items()}
    lowest = max(graphs.values(), key=lambda p: PRECISION_ORDER.index(p) if p in PRECISION_ORDER else 0)
    return {"preprocess": lowest, **graphs, "answers": lowest, "accuracy": lowest}


def compare(runtime, reference, records, policy: dict, max_new_tokens: int = 8, progress=None) -> list[StageResult]:
    """Every record through both pipelines; figures per stage, judged by the policy."""
    import torch

    from tgedge.evaluate import normalize
    from tgedge.preprocess import split_views, stack_views

    model = reference.model
    diffs = {s: Diff() for s in ("preprocess", "text_guide", "vision", "fusion", "embed", "decoder")}
    top1 = positions = exact = ref_ok = rt_ok = answered = 0
    kl_max, kl_sum, first_divergence = 0.0, 0.0, []
    t = torch.from_numpy
    for r in records:
        inputs, rt_inputs = reference.pre(r.image, r.prompt), runtime.pre(r.image, r.prompt)
        for a, b in ((rt_inputs.input_ids, inputs.input_ids), (rt_inputs.pixel_values, inputs.pixel_values),
                     (rt_inputs.crops, inputs.crops), (rt_inputs.guide_ids, inputs.guide_ids)):
            if (a is None) != (b is None):
                raise TgedgeError("the export's preprocessing and the reference's disagree on which inputs exist")
            if a is not None:
                diffs["preprocess"].add(a, b)
        with torch.no_grad():
            tokens = pooled = None
            if runtime.manifest.has_text_guide:
                tokens, pooled = model.text_guide(t(inputs.guide_ids))
                for got, want in zip(runtime.text_guide(inputs.guide_ids), (tokens, pooled)):
                    diffs["text_guide"].add(got, want.numpy())
            views = stack_views(inputs.pixel_values, inputs.crops)
            feats = model.vision(t(views))
            diffs["vision"].add(runtime.vision(views), feats.numpy())
            main, crops = split_views(feats, 1)
            image = model.fuse(main, crops, tokens, pooled)
            diffs["fusion"].add(runtime.fuse(main.numpy(), None if crops is None else crops.numpy(),
                                             None if tokens is None else tokens.numpy(),
                                             None if pooled is None else pooled.numpy()), image.numpy())
            x = model.embed(t(inputs.input_ids), image)
            diffs["embed"].add(runtime.embed(inputs.input_ids, image.numpy()), x.numpy())
            # Greedy answers from the inputs preprocessed above (each pipeline its own, as deployed).
            ref_answer = reference.answer_inputs(inputs, reference.options(max_new_tokens=max_new_tokens))
            rt_answer = runtime.answer_inputs(rt_inputs, runtime.options(max_new_tokens=max_new_tokens))
            # Teacher forcing: the prompt and the reference's answer, both pipelines on the same embeddings.
            n = len(ref_answer.tokens)
            answer_ids = torch.tensor([ref_answer.tokens[:-1]], dtype=torch.int64)
            forced = torch.cat([x, model.language_model.embed_tokens(answer_ids)], dim=1)
            want = reference.logits(forced)[0, -n:]
            got = runtime.logits(forced.numpy())[0, -n:]
        diffs["decoder"].add(got, want)
        top1 += int((got.argmax(-1) == want.argmax(-1)).sum())
        positions += n
        kl = (np.exp(log_softmax(want)) * (log_softmax(want) - log_softmax(got))).sum(-1)
        kl_max, kl_sum = max(kl_max, float(kl.max())), kl_sum + float(kl.sum())
        exact += rt_answer.tokens == ref_answer.tokens
        if rt_answer.tokens != ref_answer.tokens:
            first_divergence.append(next((i for i, (a, b) in enumerate(zip(rt_answer.tokens, ref_answer.tokens))
                                          if a != b), min(len(rt_answer.tokens), len(ref_answer.tokens))))
        if r.answer is not None:
            answered += 1
            ref_ok += normalize(ref_answer.text) == normalize(r.answer)
            rt_ok += normalize(rt_answer.text) == normalize(r.answer)
        if progress is not None:
            progress()

    figures = {s: d.figures() for s, d in diffs.items() if d.count}
    figures["decoder"].update(top1=top1 / positions, kl_mean=kl_sum / positions, kl_max=kl_max)
    figures["answers"] = {"exact_match": exact / len(records),
                          "first_divergence_min": min(first_divergence) if first_divergence else -1,
                          "diverged": len(first_divergence)}
    if answered:
        figures["accuracy"] = {"reference": ref_ok / answered, "runtime": rt_ok / answered,
                               "drop_points": 100 * (ref_ok - rt_ok) / answered, "n": answered}
    precisions = _stage_precisions(runtime.manifest)
    return [StageResult(s, precisions[s], figures[s], dict(policy.get(precisions[s], {}).get(s, {}))).judge()
            for s in STAGES if s in figures]


def validate(export_dir: str | Path, data: str | Path, reference: str | Path | None = None,
             backend: str = "onnxruntime", policy: str | Path | None = None, limit: int | None = None,
             max_new_tokens: int = 8, clip: str | Path | None = None, show_progress: bool = True) -> ValidationReport:
    import time

    from tqdm import tqdm

    from tgedge.checkpoint import load_model
    from tgedge.data.folder import read_folder
    from tgedge.reference import TorchPipeline
    from tgedge.runtime.pipeline import Pipeline

    if limit is not None and limit < 1:
        raise TgedgeError(f"--limit must be >= 1 (got {limit})")
    rules = load_policy(policy)
    records = read_folder(data)[:limit]
    start = time.perf_counter()
    with Pipeline(export_dir, backend) as runtime:
        source = runtime.manifest.source
        reference = reference or source.get("checkpoint")
        if not reference:
            raise TgedgeError(f"{export_dir}: the manifest names no source checkpoint: pass --reference MODEL")
        model, ckpt = load_model(reference, clip)
        from tgedge.export.onnx_export import checkpoint_hash

        if source.get("sha256") and checkpoint_hash(ckpt.path) != source["sha256"]:
            log.warning("%s is not the checkpoint this export was made from (weights hash differs)", reference)
        ref = TorchPipeline(model, ckpt.preprocessor, runtime.context)
        with tqdm(total=len(records), desc="validate", unit="sample", disable=not show_progress or None,
                  file=sys.stderr) as bar:
            stages = compare(runtime, ref, records, rules, max_new_tokens, progress=bar.update)
    return ValidationReport(str(export_dir), str(reference), backend, len(records), stages,
                            time.perf_counter() - start)

