"""`tgedge validate`: an export on a runtime backend against the PyTorch fp32 reference, stage by stage.

Each stage's graph gets the reference's own inputs, so a stage's figures are its own drift, not its
predecessors': preprocess (ids and pixels from the export's preprocess.json), text_guide, vision, fusion,
embed, decoder (logits under teacher forcing on the reference's answer tokens), then end to end: greedy
answers and task accuracy. A policy (TOML) gives the limits; the report names the first stage out of budget.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from tgedge.config import bad_numbers
from tgedge.contract import ALL_STAGES
from tgedge.drift import NOISE_FLOOR, noise_ratio, rel_l2
from tgedge.errors import TgedgeError
from tgedge.fileio import regular_file
from tgedge.generate import forced_logits
from tgedge.precision import PRECISIONS
from tgedge.stageflow import StageFlow

log = logging.getLogger("tgedge")

# What a report judges, in order: preprocessing, every stage of the contract, then end to end.
STAGES = ("preprocess", *ALL_STAGES, "answers", "accuracy")
DEFAULT_POLICY = Path(__file__).parent / "policies" / "default.toml"
# limit key -> (figure it bounds, True when the figure must stay at or below the limit)
LIMITS = {"max_abs": ("max_abs", True), "max_rel": ("max_rel", True), "max_rel_l2": ("max_rel_l2", True),
          "max_noise_ratio": ("noise_ratio", True), "min_cosine": ("min_cosine", False),
          "min_top1": ("top1", False), "max_kl": ("kl_max", True), "min_exact_match": ("exact_match", False),
          "max_drop": ("drop_points", True)}


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    regular_file(path, "policy file")  # a FIFO would block the read below
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise TgedgeError(f"{path}: policy file not found") from None
    except OSError as e:
        raise TgedgeError(f"{path}: cannot read the policy ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise TgedgeError(f"{path}: the policy is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise TgedgeError(f"{path}: not valid TOML ({e})") from None


# What a limit may be: the figure it bounds has a range (a cosine is in [-1, 1], a fraction in [0, 1], a difference
# >= 0), and a limit outside it, or one a useless runtime passes (all-zero outputs, uniform next-token guesses), would
# judge nothing. RANGES are the accepted limits (docs/CI.md lists them; a test holds the two equal).
FRACTIONS = ("min_top1", "min_exact_match")  # fractions: a limit of 0 or less never fails
POINTS = ("max_drop",)  # accuracy points lost, out of 100: a limit of 100 or more never fails
FP16_MAX = 65504.0  # max_abs: no difference beyond fp16's largest number is agreement (fp16 outputs cannot hold it)
NOISE_CEILING = round(1 / NOISE_FLOOR)  # an all-zero output's noise_ratio at most: rel L2 1 over the floored noise
_CEILING = f"{NOISE_CEILING:.0e}".replace("e+0", "e")  # 1e6
RANGES = {"max_abs": f"[0, {FP16_MAX:g}]", "max_rel": "[0, 1)", "max_rel_l2": "[0, 1)",
          "max_noise_ratio": f"[0, {_CEILING})", "min_cosine": "(0, 1]", "min_top1": "(0, 1]",
          "max_kl": "[0, ln(vocabulary size))", "min_exact_match": "(0, 1]", "max_drop": "[0, 100)"}


def kl_ceiling(vocab_size: int) -> float:
    """KL(reference || uniform) = ln V - H(reference) <= ln V: a max_kl at or above it passes a runtime that knows
    nothing."""
    return math.log(vocab_size)


def limit_problem(key: str, value, vocab_size: int | None = None) -> str | None:
    """Why `value` cannot be the limit `key` (None when it can): a finite number (not a boolean), in RANGES[key]:
    in the figure's range, and one a useless runtime fails. `vocab_size`: the decoder's, for max_kl's ceiling (without
    it max_kl need only be finite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number (got {value!r})"
    if math.isnan(value):
        return None  # the caller's NaN message (a NaN limit passes everything)
    expected = f"expected a number in {RANGES[key]}"
    if key == "min_cosine":
        if value <= -1:
            return f"= {value!r} can never fail (a cosine is never below -1): {expected}"
        if value <= 0:
            return f"= {value!r} passes an all-zero output (its cosine is 0): {expected}"
        return None if value <= 1 else f"must be in {RANGES[key]} (got {value!r})"
    if key in FRACTIONS:
        if value <= 0:
            return f"= {value!r} can never fail (the fraction is never below 0): {expected}"
        return None if value <= 1 else f"must be in {RANGES[key]} (got {value!r})"
    if value < 0:
        return f"must be in {RANGES[key]} (got {value!r})"
    if key in POINTS and value >= 100:
        return f"= {value!r} can never fail (accuracy, in points, drops by at most 100): {expected}"
    if key in ("max_rel", "max_rel_l2") and value >= 1:
        return f"= {value!r} passes an all-zero output (its {key} figure is 1): {expected}"
    if key == "max_noise_ratio" and value >= NOISE_CEILING:
        return (f"= {value!r} passes an all-zero output (relative L2 1 is at most {_CEILING} noises, the "
                f"noise being floored at {NOISE_FLOOR:g}): {expected}")
    if key == "max_abs" and value > FP16_MAX:
        return f"= {value!r} is beyond fp16's largest number: no difference that large is agreement: {expected}"
    if value == math.inf:
        return f"= inf can never fail: {expected}"
    if key == "max_kl" and vocab_size is not None and vocab_size >= 2 and value >= kl_ceiling(vocab_size):
        ceiling = kl_ceiling(vocab_size)
        return (f"= {value!r} passes a runtime that knows nothing (uniform over the export's {vocab_size} tokens it "
                f"is at most ln({vocab_size}) = {ceiling:.4g} nats from the reference): expected a number in "
                f"[0, {ceiling:.4g})")
    return None


def check_policy(tree: dict, path, vocab_size: int | None = None) -> None:
    """Sections, stages and limits known, every limit a number the figure can fail (`limit_problem`); every problem
    in one message."""
    nan = [b for b in bad_numbers(tree) if b.endswith(" nan")]
    if nan:  # a NaN limit would pass everything: every comparison with NaN is False
        raise TgedgeError(f"{path}: limits must be finite numbers: {', '.join(nan)}")
    problems = []
    for precision, stages in tree.items():
        if precision not in PRECISIONS:
            raise TgedgeError(f"{path}: unknown precision section [{precision}] (known: {', '.join(PRECISIONS)})")
        if not isinstance(stages, dict):
            raise TgedgeError(f"{path}: {precision} must be a section of stages (got {stages!r})")
        for stage, limits in stages.items():
            if stage not in STAGES:
                raise TgedgeError(f"{path}: unknown stage [{precision}.{stage}] (known: {', '.join(STAGES)})")
            if not isinstance(limits, dict):
                raise TgedgeError(f"{path}: {precision}.{stage} must be a section of limits (got {limits!r})")
            unknown = [k for k in limits if k not in LIMITS]
            if unknown:
                raise TgedgeError(f"{path}: [{precision}.{stage}] unknown limit(s) {', '.join(unknown)} "
                                  f"(known: {', '.join(LIMITS)})")
            problems += [f"{precision}.{stage}.{k} {why}" for k, v in limits.items()
                         if (why := limit_problem(k, v, vocab_size)) is not None]
    if problems:
        raise TgedgeError(f"{path}: {'; '.join(problems)}")


def load_policy(path: str | Path | None = None,
                vocab_size: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """The default policy, with a user file's keys laid over it; unknown precisions, stages or limits are errors,
    and so is a limit that is not a number in its figure's range or can never fail (`limit_problem`; max_kl's
    ceiling needs the decoder's `vocab_size`)."""
    policy = _toml(DEFAULT_POLICY)
    check_policy(policy, DEFAULT_POLICY, vocab_size)
    if path is None:
        return policy
    user = _toml(Path(path))
    check_policy(user, path, vocab_size)
    for precision, stages in user.items():
        for stage, limits in stages.items():
            policy.setdefault(precision, {}).setdefault(stage, {}).update(limits)
    return policy


# -- figures ----------------------------------------------------------------------------------------------------
class Diff:
    """Running figures for one stage's tensors over all samples."""

    def __init__(self):
        self.max_abs, self.ref_max, self.abs_sum, self.count, self.min_cosine = 0.0, 0.0, 0.0, 0, 1.0
        self.rel_l2: dict[str, float] = {}  # per output: the largest rel L2 over the samples
        self.noise: dict[str, float] = {}  # per output: the reference's own noise (first sample), where measured

    def add(self, got, want, output: str = "") -> None:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        self.rel_l2[output] = max(self.rel_l2.get(output, 0.0), rel_l2(got, want))
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
        out = {"max_abs": self.max_abs, "mean_abs": self.abs_sum / max(self.count, 1),
               "max_rel": self.max_abs / self.ref_max if self.ref_max else self.max_abs, "min_cosine": self.min_cosine,
               "max_rel_l2": max(self.rel_l2.values(), default=0.0)}
        if self.noise:  # drift in units of noise, output by output (tgedge.drift)
            out["noise"] = max(self.noise.values())
            out["noise_ratio"] = max(noise_ratio(self.rel_l2.get(k, 0.0), n) for k, n in self.noise.items())
        return out


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

    def margins(self) -> dict[str, float]:
        """Per limit, how far inside it the figure is (> 1 passes): limit / figure for upper limits, and for the
        lower ones (cosine, top-1, exact match, at most 1) the room left below 1, (1 - limit) / (1 - figure)."""
        out = {}
        for key, limit in self.limits.items():
            figure, upper = LIMITS[key]
            value = self.figures.get(figure)
            if value is None:
                continue
            room, used = (limit, value) if upper else (1.0 - limit, 1.0 - value)
            out[key] = room / used if used > 0 else (math.inf if room >= 0 else 0.0)
        return out

    def to_dict(self) -> dict:
        def finite(d):  # JSON has no inf
            return {k: (v if math.isfinite(v) else str(v)) for k, v in d.items()}

        return {"stage": self.name, "precision": self.precision, "passed": self.passed,
                "figures": finite(self.figures), "limits": self.limits, "margins": finite(self.margins()),
                "breaches": self.breaches}


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


# -- run, then compare -------------------------------------------------------------------------------------------
@dataclass
class SampleRun:
    """One sample through both pipelines: the data `compare` judges."""
    preprocess: list[tuple[np.ndarray, np.ndarray]]  # (runtime's, reference's) ids, pixels, crops, guide ids
    stages: list[tuple[str, dict, dict]]  # (stage, runtime outputs, reference outputs), both fed the reference's inputs
    forced: tuple[np.ndarray, np.ndarray]  # decoder logits (n, V) teacher-forced on the reference's answer: (rt, ref)
    tokens: tuple[list[int], list[int]]  # greedy answers (runtime, reference)
    texts: tuple[str, str]
    expected: str | None = None  # the data folder's answer
    # stage -> output -> rel_l2(reference fp32, reference float64): the reference's own noise (tgedge.drift)
    noise: dict[str, dict[str, float]] = field(default_factory=dict)


class _Traced(StageFlow):
    """A pipeline's stage flow that records each stage call (name, feed, outputs)."""

    def __init__(self, pipe):
        self.pipe, self.contract, self.pre, self.calls = pipe, pipe.contract, pipe.pre, []

    def run_stage(self, name, feed):
        out = self.pipe.run_stage(name, feed)
        self.calls.append((name, feed, {k: v.copy() for k, v in out.items()}))  # the flow may write into `out`
        return out


def run_sample(runtime, reference, record, max_new_tokens: int = 8, noise_stages=frozenset()) -> SampleRun:
    """`noise_stages`: the stages whose reference noise this sample also measures (float64, `tgedge.noise`)."""
    inputs, rt_inputs = reference.pre(record.image, record.prompt), runtime.pre(record.image, record.prompt)
    preprocess = []
    for field_name in ("input_ids", "pixel_values", "crops", "guide_ids"):
        a, b = getattr(rt_inputs, field_name), getattr(inputs, field_name)
        if (a is None) != (b is None):
            raise TgedgeError("the export's preprocessing and the reference's disagree on which inputs exist")
        if a is not None:
            preprocess.append((a, b))
    traced = _Traced(reference)
    x = traced.embeddings(inputs)
    stages = [(name, runtime.run_stage(name, feed), want) for name, feed, want in traced.calls]
    # Greedy answers from the inputs preprocessed above (each pipeline its own, as deployed); the reference's from
    # the embeddings it has just computed (its stages once per sample, not twice).
    ref_answer = reference.answer_inputs(inputs, reference.options(max_new_tokens=max_new_tokens), embeddings=x)
    rt_answer = runtime.answer_inputs(rt_inputs, runtime.options(max_new_tokens=max_new_tokens))
    # Teacher forcing on the reference's answer, both pipelines from the same prompt embeddings, step by step.
    logits = (forced_logits(runtime, x, ref_answer.tokens), forced_logits(reference, x, ref_answer.tokens))
    noise = {}
    if noise_stages:
        from tgedge.noise import forced_logits_exact, stage_exact

        for name, feed, want in traced.calls:
            if name in noise_stages:
                exact = stage_exact(reference.model, name, feed)
                noise[name] = {k: max(noise.get(name, {}).get(k, 0.0), rel_l2(v, exact[k])) for k, v in want.items()}
        if "decoder" in noise_stages:
            exact = forced_logits_exact(reference.model, np.asarray(x), ref_answer.tokens)
            noise["decoder"] = {"logits": rel_l2(logits[1], exact)}
    return SampleRun(preprocess, stages, logits, (rt_answer.tokens, ref_answer.tokens),
                     (rt_answer.text, ref_answer.text), record.answer, noise)


def run_samples(runtime, reference, records, max_new_tokens: int = 8, progress=None, noise_stages=frozenset()):
    """Every record through both pipelines, one `SampleRun` at a time; the first also measures the noise of
    `noise_stages`."""
    for i, record in enumerate(records):
        with record.errors():
            run = run_sample(runtime, reference, record, max_new_tokens, noise_stages if i == 0 else frozenset())
        yield run
        if progress is not None:
            progress()


def source_checkpoint(manifest) -> Path:
    """The checkpoint an export was made from: the word `demo`, else its absolute path, its path relative to the
    export directory, or (older manifests) the path as given, relative to the export directory or to here."""
    from tgedge import DEMO_NAME, demo_checkpoint

    source = manifest.source
    given = source.get("checkpoint")
    if not given:
        raise TgedgeError(f"{manifest.directory}: the manifest names no source checkpoint: pass --reference MODEL")
    if given == DEMO_NAME:
        return demo_checkpoint()
    candidates = [source.get("path"), source.get("relative") and manifest.directory / source["relative"],
                  manifest.directory / given, given]
    for c in candidates:
        if c and (Path(c) / "config.json").exists():
            return Path(c)
    raise TgedgeError(f"{manifest.directory}: its source checkpoint {given!r} is not found (looked at "
                      f"{', '.join(str(c) for c in candidates if c)}): pass --reference MODEL")


def check_precisions(manifest) -> None:
    """Each graph's label in the manifest is the precision the graph really has (read from its ops and weights)."""
    from tgedge.inspection import inspect_onnx

    wrong = [f"{g} says {e.precision}, its graph is {actual}" for g, e in manifest.graphs.items()
             if (actual := inspect_onnx(manifest.graph_path(g)).precision) != e.precision]
    if wrong:
        raise TgedgeError(f"{manifest.directory}: precision labels do not match the graphs ({'; '.join(wrong)}): the "
                          "wrong policy would judge them; quantize again, or pass --no-verify")


def _stage_precisions(manifest) -> dict[str, str]:
    graphs = {g: e.precision for g, e in manifest.graphs.items()}
    lowest = max(graphs.values(), key=lambda p: PRECISIONS[p].rank if p in PRECISIONS else 0)
    return {"preprocess": lowest, **graphs, "answers": lowest, "accuracy": lowest}


def compare(runs, precisions: dict[str, str], policy: dict) -> list[StageResult]:
    """Figures per stage over every run, judged by the policy."""
    from tgedge.evaluate import normalize

    diffs = {s: Diff() for s in ("preprocess", *ALL_STAGES)}
    top1 = positions = exact = ref_ok = rt_ok = answered = samples = 0
    kl_max, kl_sum, first_divergence = 0.0, 0.0, []
    for run in runs:
        samples += 1
        for got, want in run.preprocess:
            diffs["preprocess"].add(got, want)
        for stage, got, want in run.stages:
            for name, value in want.items():
                diffs[stage].add(got[name], value, name)
        for stage, outputs in run.noise.items():
            diffs[stage].noise.update(outputs)
        got, want = run.forced
        diffs["decoder"].add(got, want, "logits")
        top1 += int((got.argmax(-1) == want.argmax(-1)).sum())
        positions += len(want)
        kl = (np.exp(log_softmax(want)) * (log_softmax(want) - log_softmax(got))).sum(-1)
        kl_max, kl_sum = max(kl_max, float(kl.max())), kl_sum + float(kl.sum())
        rt_tokens, ref_tokens = run.tokens
        exact += rt_tokens == ref_tokens
        if rt_tokens != ref_tokens:
            first_divergence.append(next((i for i, (a, b) in enumerate(zip(rt_tokens, ref_tokens)) if a != b),
                                         min(len(rt_tokens), len(ref_tokens))))
        if run.expected is not None:
            answered += 1
            ref_ok += normalize(run.texts[1]) == normalize(run.expected)
            rt_ok += normalize(run.texts[0]) == normalize(run.expected)

    figures = {s: d.figures() for s, d in diffs.items() if d.count}
    figures["decoder"].update(top1=top1 / positions, kl_mean=kl_sum / positions, kl_max=kl_max)
    figures["answers"] = {"exact_match": exact / samples,
                          "first_divergence_min": min(first_divergence) if first_divergence else -1,
                          "diverged": len(first_divergence)}
    if answered:
        figures["accuracy"] = {"reference": ref_ok / answered, "runtime": rt_ok / answered,
                               "drop_points": 100 * (ref_ok - rt_ok) / answered, "n": answered}
    return [StageResult(s, precisions[s], figures[s], dict(policy.get(precisions[s], {}).get(s, {}))).judge()
            for s in STAGES if s in figures]


def validate(export_dir: str | Path, data: str | Path, reference: str | Path | None = None,
             backend: str = "onnxruntime", policy: str | Path | None = None, limit: int | None = None,
             max_new_tokens: int = 8, clip: str | Path | None = None, show_progress: bool = True,
             verify: bool = True) -> ValidationReport:
    """`verify`: before judging, check each graph's bytes against the manifest (sha256) and that each graph has the
    precision its label says (the policy is chosen by that label)."""
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
    with Pipeline(export_dir, backend, verify="sha256" if verify else None) as runtime:
        vocab = (runtime.manifest.model.get("decoder") or {}).get("vocab_size")
        if isinstance(vocab, int):  # again, now that the vocabulary is known: max_kl below ln(vocab_size)
            rules = load_policy(policy, vocab_size=vocab)
        if verify:
            check_precisions(runtime.manifest)
        source = runtime.manifest.source
        given = reference is not None
        reference = reference or source_checkpoint(runtime.manifest)
        model, ckpt = load_model(reference, clip)
        from tgedge.fileio import checkpoint_hash

        what = f"--reference {reference}" if given else f"the export's source checkpoint {reference}"
        ours, theirs = json.loads(json.dumps(model.cfg.to_dict())), runtime.manifest.model  # as the manifest holds it
        differ = sorted(k for k in set(ours) | set(theirs) if k != "layout" and ours.get(k) != theirs.get(k))
        if differ:  # another architecture: its stages cannot be compared with the export's
            raise TgedgeError(f"{what}: another model than the export's ({', '.join(differ)} differ from "
                              f"{export_dir}/manifest.json model): give the checkpoint the export was made from")
        if source.get("sha256") and checkpoint_hash(ckpt.path) != source["sha256"]:
            log.warning("%s is not the checkpoint this export was made from (weights hash differs)", what)
        ref = TorchPipeline(model, ckpt.preprocessor, runtime.context)
        with tqdm(total=len(records), desc="validate", unit="sample", disable=not show_progress or None,
                  file=sys.stderr) as bar:
            precisions = _stage_precisions(runtime.manifest)
            noise_stages = frozenset(s for s, p in precisions.items() if "max_noise_ratio" in rules.get(p, {}).get(s, {}))
            runs = run_samples(runtime, ref, records, max_new_tokens, progress=bar.update, noise_stages=noise_stages)
            stages = compare(runs, precisions, rules)
    return ValidationReport(str(export_dir), str(reference), backend, len(records), stages,
                            time.perf_counter() - start)

