"""`tgedge quantize`: an fp32 export directory -> a new one with fp16 / int8 / weight-only graphs.

Four steps: `plan_quantization` (each graph's precision, from the precision table), `calibrate` (int8's activation
ranges on the real inputs of each graph, `tgedge.calibration.collect`: min/max folded while the samples run, entropy /
percentile from recorded feeds; saved as `calibration.json`), `Rewrite` (each graph through its converter in
`tgedge.calibration.convert`: fp16, Q/DQ int8 as TensorRT wants it, int4w / int8w MatMulNBits) and `write_manifest`.
Attention's MatMuls between two activations stay fp32 in int8 unless `int8_attention`.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from tgedge.errors import TgedgeError
from tgedge.calibration.collect import FeedReader
from tgedge.calibration.convert import (QUANT_OPS, GraphReport, matched_nodes, restore_shared, shared_refs,
                                        activation_products, save_graph, to_fp16, to_int8, to_weight_only)
from tgedge.calibration.smooth import AUTO, DEFAULT_ALPHA, OUTLIER_RATIO, SEARCH
from tgedge.calibration.saved import CALIBRATION, METHODS, graph_method, read_calibration
from tgedge.calibration.weight_only import WeightOnly
from tgedge.fileio import atomic_dir, inside, sha256_files
from tgedge.precision import FLOAT, PRECISIONS, QDQ, REFERENCE, WEIGHT_ONLY, Precision, names
from tgedge.runtime.manifest import Manifest, graph_fingerprint


OUTLIER_CHANNELS = ("int8", "fp32")  # --outlier-channels: left to --smooth, or computed in fp32 (the split)


def parse_precision(spec: str, graphs: list[str]) -> dict[str, Precision]:
    """`int8` or `vision=fp16,fusion=fp16,decoder=int8` -> graph -> precision for every graph of the export (a
    precision given alone applies to its stages, `Precision.stages`; the other graphs stay fp32)."""
    spec = spec.strip()
    if "=" not in spec:
        if spec not in PRECISIONS:
            raise TgedgeError(f"--precision: unknown precision {spec!r} (choose from {', '.join(PRECISIONS)}, or "
                              "GRAPH=PRECISION,...)")
        whole = PRECISIONS[spec]
        return {g: whole if whole.applies_to(g) else REFERENCE for g in graphs}
    plan = {g: REFERENCE for g in graphs}
    given: dict[str, str] = {}  # graph -> its part of the spec: a second one is refused, not the last winning
    for part in spec.split(","):
        graph, _, precision = part.partition("=")
        graph, precision = graph.strip(), precision.strip()
        if graph not in graphs:
            raise TgedgeError(f"unknown graph {graph!r} in --precision (this export has {', '.join(graphs)})")
        if precision not in PRECISIONS:
            raise TgedgeError(f"--precision: unknown precision {precision!r} for {graph} (choose from "
                              f"{', '.join(PRECISIONS)})")
        if graph in given:
            raise TgedgeError(f"--precision names {graph} twice ({given[graph]}, {part.strip()}): give each graph once")
        given[graph] = part.strip()
        plan[graph] = PRECISIONS[precision]
    return plan


def graph_entry(entry, precision: str, target: Path):
    """The manifest entry of a rewritten graph: its files as they are now."""
    from tgedge.fileio import usual_file_mode

    for f in target.parent.glob(f"{target.name}*"):
        usual_file_mode(f)
    structure = onnx.load(str(target), load_external_data=False)
    locations = {e.value for t in structure.graph.initializer for e in t.external_data if e.key == "location"}
    own = f"{target.name}.data" if f"{target.name}.data" in locations else None
    shared = sorted(locations - {own} if own else locations)
    files = [target] + ([target.parent / own] if own else []) + [target.parent / f for f in shared]
    return type(entry)(entry.name, entry.file, precision, entry.inputs, entry.outputs, sha256_files(files), own,
                       graph_fingerprint(files), shared)


@dataclass
class QuantizeResult:
    directory: Path
    manifest: Manifest
    reports: dict[str, GraphReport]
    calibration: dict | None = None

    def to_dict(self) -> dict:
        return {"directory": str(self.directory), "graphs": {g: r.to_dict() for g, r in self.reports.items()},
                "calibration": None if self.calibration is None else
                {k: v for k, v in self.calibration.items() if k != "graphs"}}


def _data_hash(folder: Path) -> str:
    return sha256_files([folder / "samples.jsonl"] + sorted((folder / "images").glob("*")))


# -- plan: each graph's precision, and which graphs int8 calibrates ------------------------------------------------
@dataclass
class Plan:
    precisions: dict[str, Precision]  # graph -> what it becomes
    calibrated: list[str]  # the Q/DQ graphs with MatMul / Gemm / Conv to quantise: the ones that need ranges


def plan_quantization(src: Manifest, precision: str, method: str) -> Plan:
    """Refuses what cannot be done before any work: an unknown method, an export that is not fp32, a Q/DQ decoder
    of a static-onnx export."""
    if method not in METHODS:
        raise TgedgeError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")
    not_fp32 = {g: e.precision for g, e in src.graphs.items() if e.precision != REFERENCE.name}
    if not_fp32:
        raise TgedgeError(f"{src.directory}: quantize an fp32 export (tgedge export); these graphs are not fp32: "
                          f"{not_fp32}")
    plan = parse_precision(precision, list(src.graphs))
    if "decoder" in plan and plan["decoder"].form == QDQ and src.contract.cache.mode == "static-onnx":
        raise TgedgeError(f"{src.directory}: int8 of a static-onnx decoder is not supported: onnxruntime's quantizer "
                          "writes opset-24 QuantizeLinear nodes that onnxruntime itself refuses; quantise its decoder "
                          "int4w or fp16 (e.g. --precision vision=int8,fusion=int8,decoder=int4w), or export with "
                          "--cache growing")
    calibrated = [g for g, p in plan.items() if p.form == QDQ and any(
        n.op_type in QUANT_OPS for n in onnx.load(str(src.graph_path(g)), load_external_data=False).graph.node)]
    return Plan(plan, calibrated)


# -- calibrate: the ranges int8 needs, from a saved calibration.json or measured on calibration data ---------------
@dataclass
class Calibration:
    method: str
    saved: dict | None = None  # a calibration.json given with --calibration
    saved_path: str | Path | None = None  # its path, for messages
    streamed: dict = field(default_factory=dict)  # graph -> ranges measured while the samples ran (minmax)
    feeds: dict = field(default_factory=dict)  # graph -> recorded inputs (entropy, percentile)
    data: str | Path | None = None
    samples: int = 0
    ranges: dict[str, dict] = field(default_factory=dict)  # graph -> its ranges as measured (before any smoothing)
    # SmoothQuant (tgedge.calibration.smooth): alpha, "auto" (DEFAULT_ALPHA on the inputs with outlier channels),
    # "search" (every input, its alpha searched) or None, and graph -> input tensor -> max |x| per channel (before
    # smoothing)
    smooth: float | str | None = None
    channels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # graph -> input tensor -> mean of x^2 per channel: for AWQ-style weight-only scales and `search`
    mean_sq: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # --outlier-channels fp32: the inputs' outlier channels computed in fp32 beside the int8 MatMuls
    # (tgedge.calibration.outliers), found from `channels`
    split: bool = False

    @property
    def alpha(self) -> float | None:
        return DEFAULT_ALPHA if self.smooth == AUTO else None if self.smooth == SEARCH else self.smooth

    def write_cache(self, graph: str, cache: Path, smoothed: dict[str, float] | None = None,
                    added: set[str] = frozenset(), copied: dict[str, str] | None = None) -> None:
        """The ranges of `graph` where onnxruntime's quantize_static reads them (none: it measures on the feeds),
        kept as measured in `ranges` (calibration.json); `smoothed`: tensor -> its symmetric range after SmoothQuant
        (max |x| / s) or the outlier split (the regular channels' max |x|), which the cache gets in place of the
        measured one; `added`: those of them the rewrite made (no measured range to replace); `copied`: tensor the
        rewrite made -> the measured tensor whose range it takes."""
        if self.saved is not None:  # the method as onnxruntime's loader reads it back, whichever way the file says it
            saved = dict(self.saved["graphs"][graph], calibration_method={
                "CLS": "CalibrationMethod", "value": f"CalibrationMethod.{graph_method(self.saved['graphs'][graph])}"})
            cache.write_text(json.dumps(saved))
        elif graph in self.streamed:
            from onnxruntime.quantization.calibrate import save_tensors_data

            save_tensors_data(self.streamed.pop(graph), cache)
        else:
            return
        data = json.loads(cache.read_text())
        self.ranges[graph] = json.loads(json.dumps(data))
        for new, old in (copied or {}).items():
            if old in data["data"]:
                data["data"][new] = dict(data["data"][old])
        if smoothed or copied:
            for t, m in (smoothed or {}).items():
                if t in added:
                    data["data"][t] = {"CLS": "TensorData"}
                if t in data["data"]:
                    for key, value in (("lowest", -m), ("highest", m)):
                        data["data"][t][key] = {"data": [value], "dtype": "float32", "CLS": "numpy.array"}
            cache.write_text(json.dumps(data))

    def record(self) -> dict | None:
        """calibration.json: where the ranges came from, and the ranges (None when no graph used any)."""
        if not self.ranges and not self.mean_sq and not (self.split and self.channels):
            return None
        record = self.saved if self.saved is not None else {
            "method": self.method, "data": {"path": str(self.data), "samples": self.samples,
                                            "sha256": _data_hash(Path(self.data))}}
        out = {**{k: v for k, v in record.items() if k not in ("graphs", "smooth", "channels")}, "graphs": self.ranges}
        if (self.smooth is not None or self.split) and self.channels:
            # the alpha ("search": the alphas follow from `channels` and `mean_sq`); which inputs `auto` smoothed
            # and which channels the outlier split took follow from `channels`
            if self.smooth is not None:
                out["smooth"] = SEARCH if self.smooth == SEARCH else self.alpha
            out["channels"] = {g: {t: [float(x) for x in v] for t, v in c.items()} for g, c in self.channels.items()}
        if self.mean_sq:
            out["mean_sq"] = {g: {t: [float(x) for x in v] for t, v in c.items()} for g, c in self.mean_sq.items()}
        return out


def calibrate(export_dir: str | Path, graphs: list[str], method: str, calib: str | Path | None,
              calibration: str | Path | None, calib_limit: int | None, say: Callable[[str], None],
              progress=None, smooth: float | str | None = AUTO, awq: list[str] = (),
              verify: str | None = "fingerprint", split: bool = False, split_weight_only: list[str] = ()) -> Calibration:
    """`graphs`' ranges: read from `calibration` (a saved calibration.json), else measured with the fp32 export
    answering the `calib` samples. `smooth`: SmoothQuant's alpha, "auto" or None (off); its per-channel maxima are
    measured in the same pass (min/max only) or read from the saved file. `awq`: the weight-only graphs that get AWQ-style scales,
    their per-channel mean squares measured in the same pass. `split`: outlier channels in fp32
    (`tgedge.calibration.outliers`), found from the same per-channel maxima, in the int8 graphs and in
    `split_weight_only` (weight-only graphs: their per-channel maxima measured too)."""
    if smooth == AUTO and not graphs:  # no int8 graph: nothing to smooth
        smooth = None
    if smooth == AUTO and method != "minmax":  # the per-channel maxima come from the min/max pass only
        say(f"--smooth auto: --method {method} measures no per-channel maxima: not smoothed")
        smooth = None
    split_weight_only = list(split_weight_only) if split else []
    result = Calibration(method, data=calib, smooth=smooth, split=split and bool(graphs or split_weight_only))
    if not graphs and not awq and not split_weight_only:
        return result
    for flag, on in (("--smooth", smooth is not None), ("--awq", bool(awq)), ("--outlier-channels fp32", split)):
        if on and method != "minmax":
            raise TgedgeError(f"{flag} needs --method minmax (its per-channel statistics are measured in the min/max "
                              f"pass; got {method})")
    if calibration is not None:
        result.saved, result.saved_path = read_calibration(calibration, graphs), calibration
        if result.saved["method"] != method:  # onnxruntime refuses ranges from another method, with a traceback
            raise TgedgeError(f"--method {method}: {calibration} was measured with method {result.saved['method']}: "
                              f"leave --method out (or pass --method {result.saved['method']}), or measure again "
                              "with --calib DIR")
        saved = result.saved.get("mean_sq")
        for flag, wanted in (("--awq", list(awq)), ("--smooth search", graphs if smooth == SEARCH else [])):
            if not wanted:
                continue
            if not isinstance(saved, dict) or any(g not in saved for g in wanted):
                raise TgedgeError(f"{calibration}: no per-channel statistics for {flag} (it was calibrated without "
                                  f"{flag}): calibrate again with --calib DIR")
            result.mean_sq.update({g: {t: np.asarray(v, np.float64) for t, v in saved[g].items()} for g in wanted})
        channels = result.saved.get("channels")
        has_channels = isinstance(channels, dict) and all(g in channels for g in graphs)
        if split and not (isinstance(channels, dict) and all(g in channels for g in split_weight_only)):
            has_channels = False
        if smooth == AUTO and not has_channels:
            say(f"--smooth auto: {calibration} has no per-channel maxima (calibrated with --smooth none): "
                "not smoothed")
            result.smooth = smooth = None
        if smooth is not None or split:
            if not has_channels:
                what, way = (("SmoothQuant", "--smooth none") if smooth is not None else
                             ("--outlier-channels fp32", "--outlier-channels int8"))
                raise TgedgeError(f"{calibration}: no per-channel maxima for {what} (it was calibrated with "
                                  f"--smooth none): calibrate again with --calib DIR, or quantize with {way}")
            result.channels = {g: {t: np.asarray(v, np.float64) for t, v in channels[g].items()}
                               for g in [*graphs, *split_weight_only]}
        return result
    if calib is None:
        raise TgedgeError(f"{'int8' if graphs else '--awq' if awq else '--outlier-channels fp32'} needs calibration data: --calib DIR (images/ + "
                          "samples.jsonl, e.g. `tgedge data shapes --split calibration -o DIR`) or --calibration "
                          "calibration.json")
    from tgedge.calibration.collect import collect, collect_ranges
    from tgedge.data.folder import read_folder

    result.samples = len(read_folder(calib)[:calib_limit])
    if method == "minmax":
        measured = sorted(set(graphs) | set(awq) | set(split_weight_only))
        say(f"measuring the ranges of {', '.join(measured)} on {calib} ({result.samples} samples, streamed)")
        result.streamed = collect_ranges(export_dir, calib, measured, QUANT_OPS, calib_limit, progress=progress,
                                         channel_absmax=result.channels if smooth is not None or split else None,
                                         channel_mean_sq=result.mean_sq if awq or smooth == SEARCH else None,
                                         verify=verify)
        for g in set(result.mean_sq) - set(awq) - (set(graphs) if smooth == SEARCH else set()):
            del result.mean_sq[g]
    else:
        say(f"recording the inputs of {', '.join(graphs)} on {calib} ({result.samples} samples, kept for {method})")
        result.feeds = collect(export_dir, calib, calib_limit, progress=progress, verify=verify)
    return result


# -- rewrite: each graph into the new directory, in its precision --------------------------------------------------
@dataclass
class Rewrite:
    """Writes the graphs of `src` into `out` one by one; graphs that stay fp32 are copied byte for byte."""
    src: Manifest
    out: Path
    work: Path  # scratch: quantize_static's range caches
    calibration: Calibration
    exclude: list[str]
    settings: dict  # WeightOnly.of's block_size, accuracy_level
    int8_attention: bool = False
    say: Callable[[str], None] = lambda s: None
    graphs: dict = field(default_factory=dict)  # graph -> its new manifest entry
    reports: dict[str, GraphReport] = field(default_factory=dict)
    used_patterns: set[str] = field(default_factory=set)
    verbatim: set[str] = field(default_factory=set)  # weight files copied byte for byte (with their graphs)

    def graph(self, graph: str, p: Precision) -> None:
        entry, path = self.src.graphs[graph], self.src.graph_path(graph)
        structure = onnx.load(str(path), load_external_data=False)  # ops and names; weights stay on disk
        excluded = matched_nodes(structure, self.exclude)
        self.used_patterns |= {e for e in self.exclude if any(fnmatch.fnmatchcase(n, e) for n in excluded)}
        self.say(f"{graph}: {p.name}" + (f" ({len(excluded)} nodes excluded)" if excluded else ""))
        target = inside(self.out, entry.file, f"manifest.json graphs.{graph}.file")
        # fp16 converts every graph; the others quantise MatMul / Gemm / Conv, and a graph without any stays fp32
        keep = p is REFERENCE or (p.form != FLOAT and not any(n.op_type in QUANT_OPS for n in structure.graph.node))
        if keep and all(f in self.verbatim for f in entry.shared_data):
            self._copy(graph, p)
            return
        shared = shared_refs(structure, entry.external_data, self.verbatim)
        if p.form == QDQ:
            report = self._to_qdq(graph, p, path, target, excluded, structure, bool(entry.external_data))
        else:
            proto = onnx.load(str(path))
            if keep:
                report = GraphReport(REFERENCE.name, note="its shared weights were re-written")
            elif p.form == FLOAT:
                proto, report = to_fp16(proto, excluded)
            else:
                q = WeightOnly.of(p, **self.settings)
                scaled, notes, kept = {}, [], list(excluded)
                mean_sq = self.calibration.mean_sq.get(graph)
                if self.calibration.split and graph in self.calibration.channels:
                    from tgedge.calibration.outliers import split

                    splits = split(proto, self.calibration.channels[graph], skip=set(excluded))
                    kept += [n for s in splits.values() for n in s.fp32_nodes]
                    if splits:
                        counts = sorted(len(s.channels) for s in splits.values())
                        notes.append(f"outlier channels in fp32 (--outlier-channels fp32): {len(splits)} MatMul "
                                     f"inputs, {counts[0]}-{counts[-1]} channels each")
                    if mean_sq is not None:  # AWQ sees the regular channels; the outliers' weight rows are zero
                        mean_sq = dict(mean_sq)
                        for t, s in splits.items():
                            m = np.asarray(mean_sq.pop(t), np.float64).copy()
                            m[s.channels] = np.median(np.delete(m, s.channels))
                            mean_sq[s.regular] = m
                if mean_sq is not None:
                    from tgedge.calibration.smooth import activation_aware

                    scaled = activation_aware(proto, mean_sq, q.bits, q.block_size)
                proto, report = to_weight_only(proto, q, kept)
                if scaled:
                    exponents = [a for _, a in scaled.values()]
                    notes.append(f"AWQ-style scales on {len(scaled)} MatMul inputs (exponent median "
                                 f"{float(np.median(exponents)):.1f})")
                if notes:  # after the converter's own (its block and accuracy level)
                    report.note = "; ".join(filter(None, [report.note, *notes]))
            restore_shared(proto, shared)
            save_graph(proto, target)
            del proto
        self.reports[graph] = report
        self.graphs[graph] = graph_entry(entry, report.precision, target)

    def _copy(self, graph: str, p: Precision) -> None:
        entry = self.src.graphs[graph]
        for f in self.src.graph_files(graph)[:2 if entry.external_data else 1]:
            shutil.copyfile(f, self.out / f.name)
        self.verbatim |= {entry.external_data} if entry.external_data else set()
        self.graphs[graph] = entry
        report = GraphReport(REFERENCE.name)
        if p is not REFERENCE:  # nothing to quantise (e.g. embed, a Gather): it stays fp32, and says so
            report.note = f"no {'/'.join(QUANT_OPS)} to quantize: kept fp32"
        self.reports[graph] = report

    def _to_qdq(self, graph: str, p: Precision, path: Path, target: Path, excluded: list[str],
                structure: onnx.ModelProto, external: bool) -> GraphReport:
        cache = self.work / f"{graph}.calibration.json"
        smoothed, source, proto, added, copied = {}, path, None, set(), {}
        channels = self.calibration.channels.get(graph)
        mean_sq = self.calibration.mean_sq.get(graph, {})
        alpha, search = self.calibration.alpha, self.calibration.smooth == SEARCH  # alpha: None with search
        how, kept = [], list(excluded)
        if self.calibration.split and channels:
            from tgedge.calibration.outliers import regular_ranges, split

            proto = onnx.load(str(path))
            splits = split(proto, channels, skip=set(excluded))
            if splits:  # what the int8 MatMuls read now: the regular channels (the outliers' maxima zeroed)
                smoothed = regular_ranges(splits, channels)
                added = set(smoothed)
                copied = {new: old for s in splits.values() for new, old in s.outputs.items()}
                kept += [n for s in splits.values() for n in s.fp32_nodes]
                channels = dict(channels)
                mean_sq = dict(mean_sq)
                for t, s in splits.items():
                    channels[s.regular] = np.where(np.isin(np.arange(len(channels[t])), s.channels), 0.0,
                                                   channels.pop(t))
                    if t in mean_sq:
                        m = np.asarray(mean_sq.pop(t), np.float64).copy()
                        m[s.channels] = 0.0
                        mean_sq[s.regular] = m
                counts = sorted(len(s.channels) for s in splits.values())
                how.append(f"outlier channels in fp32 (--outlier-channels fp32): {len(splits)} MatMul inputs, "
                           f"{counts[0]}-{counts[-1]} channels each")
            else:
                self.say(f"{graph}: no input with outlier channels (--outlier-channels fp32): nothing split")
        if alpha is not None and channels and self.calibration.smooth == AUTO:
            from tgedge.calibration.smooth import with_outliers

            channels = with_outliers(channels)
            if not channels:
                self.say(f"{graph}: no input with outlier channels (--smooth auto): not smoothed")
        if self.calibration.smooth is not None and channels:
            from tgedge.calibration.smooth import searched, smooth

            proto = proto if proto is not None else onnx.load(str(path))
            if search:
                found = searched(proto, channels, mean_sq)
                scales = {t: s for t, (s, _) in found.items()}
                alphas = sorted(a for _, a in found.values())
                how.append(f"SmoothQuant, alpha searched per input (--smooth search): {len(found)} of "
                           f"{len(channels)} MatMul inputs smoothed" + (
                               f", alpha {alphas[0]:g}-{alphas[-1]:g} (median {float(np.median(alphas)):g})"
                               if alphas else ""))
            else:
                scales = smooth(proto, channels, alpha)
                how.append(f"SmoothQuant alpha {alpha}: {len(scales)} MatMul inputs smoothed" + (
                    f" (--smooth auto: those with outlier channels, >= {OUTLIER_RATIO:g}x the median channel)"
                    if self.calibration.smooth == AUTO else ""))
            smoothed.update({t: float(np.max(channels[t] / s)) for t, s in scales.items()})
        how = "; ".join(how)
        if proto is not None:
            source = self.work / f"{graph}.rewritten.onnx"
            save_graph(proto, source)
            del proto
            if how:
                self.say(f"{graph}: {how}")
        self.calibration.write_cache(graph, cache, smoothed, added, copied)
        kept = kept if self.int8_attention else sorted(set(kept) | set(activation_products(structure)))
        saved = self.calibration.saved_path
        if saved is not None:
            tensors = {v for n in structure.graph.node for v in (*n.input, *n.output)}
            unknown = sorted(set(self.calibration.saved["graphs"][graph]["data"]) - tensors)
            if unknown:
                raise TgedgeError(f"{saved}: graphs.{graph}.data names {len(unknown)} tensor(s) the {graph} graph "
                                  f"lacks ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): it was "
                                  "measured on another export; measure again with --calib DIR")
        try:
            report = to_int8(p, source, target, FeedReader(self.calibration.feeds.get(graph, [])),
                             self.calibration.method, kept, cache, external=external)
        except ValueError as e:  # onnxruntime's word for a range the graph needs and the saved file lacks
            missing = re.search(r"not specified for param (\S+?)\.? ", str(e))
            if saved is None or missing is None:
                raise
            raise TgedgeError(f"{saved}: graphs.{graph}.data has no range for {missing.group(1)}, which the {graph} "
                              "graph quantises: measure again with --calib DIR") from None
        if how:
            report.note = how
        if graph not in self.calibration.ranges:  # the calibrators measured on the feeds: what they wrote
            self.calibration.ranges[graph] = json.loads(cache.read_text())
        return report


# -- write the manifest ----------------------------------------------------------------------------------------------
def write_manifest(src: Manifest, out: Path, rewrite: Rewrite, precision: str,
                   int8_attention: bool) -> tuple[Manifest, dict | None]:
    """manifest.json (and calibration.json when a graph was calibrated) of the rewritten export -> it and the
    calibration record."""
    record = rewrite.calibration.record()
    if record is not None:
        (out / CALIBRATION).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    calibrated = record is not None
    manifest = Manifest(graphs=rewrite.graphs, dims=src.dims, max_context=src.max_context, opset=src.opset,
                        model=src.model, source=src.source, reference=src.reference, files=src.files,
                        file_sha256=src.file_sha256, contract=src.contract,
                        quantization={"precision": precision,
                                      "method": rewrite.calibration.method if calibrated else None,
                                      "int8_attention": int8_attention if calibrated else None,
                                      "graphs": {g: r.to_dict() for g, r in rewrite.reports.items()},
                                      "calibration": CALIBRATION if calibrated else None})
    manifest.save(out)
    return manifest, record


def _refuse_ignored(plan: Plan, precision: str, calib, calibration, calib_limit: int | None, smooth: float | None,
                    block_size: int | None, accuracy_level: int | None, method: str | None = None,
                    int8_attention: bool = False, awq: bool = False) -> None:
    """Options that would change nothing for this --precision are refused, not silently ignored (`method`: the
    --method given, None when left out)."""
    if not plan.calibrated:
        measured = ["--method" if method is not None and not awq else None, "--int8-attention" if int8_attention
                    else None, "--calib" if calib is not None and not awq else None,
                    "--calibration" if calibration is not None and not awq else None]
        for flag in filter(None, measured):
            raise TgedgeError(f"{flag} is for int8 graphs (calibrated activation ranges); --precision {precision} "
                              "quantises none to int8: leave it out")
    if calib_limit is not None and calib is None:
        raise TgedgeError("--calib-limit N takes the first N samples of --calib DIR" +
                          (": --calibration reuses saved ranges, leave it out" if calibration is not None else
                           "; no --calib given"))
    if smooth is not None and smooth != AUTO and not plan.calibrated:
        raise TgedgeError(f"--smooth applies SmoothQuant to int8 graphs; --precision {precision} quantises none to "
                          "int8: leave it out")
    weight_only = any(p.weight_only for p in plan.precisions.values())
    for flag, value in (("--block-size", block_size), ("--accuracy-level", accuracy_level)):
        if value is not None and not weight_only:
            raise TgedgeError(f"{flag} sets int4w/int8w graphs' MatMulNBits blocks; --precision {precision} has "
                              "none: leave it out")


def quantize_export(export_dir: str | Path, out: str | Path, precision: str, calib: str | Path | None = None,
                    method: str | None = None, exclude: list[str] | None = None, calibration: str | Path | None = None,
                    calib_limit: int | None = None, on_step: Callable[[str], None] | None = None,
                    progress=None, force: bool = False, block_size: int | None = None,
                    accuracy_level: int | None = None, int8_attention: bool = False,
                    smooth: float | str | None = AUTO, awq: bool = False, verify: bool = True,
                    outlier_channels: str = "int8") -> QuantizeResult:
    """`block_size`, `accuracy_level`: int4w / int8w's MatMulNBits settings (None: the defaults, `WeightOnly`).
    `int8_attention`: int8 also quantises the MatMuls between two activations (`activation_products`), which it
    keeps in fp32 by default. `smooth`: SmoothQuant's alpha in [0, 1] for the int8 graphs, "auto" (the default:
    DEFAULT_ALPHA on the inputs whose calibration shows outlier channels), "search" (each input's alpha searched) or
    None (off; `tgedge.calibration.smooth`).
    `outlier_channels`: "fp32" computes the int8 graphs' outlier input channels in fp32 beside the int8 MatMuls
    (LLM.int8()'s decomposition, `tgedge.calibration.outliers`; found from the calibration's per-channel maxima, those
    inputs then smoothed only where their other channels call for it), "int8" (the default) leaves them to --smooth.
    `awq`: AWQ-style activation-aware scales before the weight-only graphs' blocks (needs calibration data). `verify`: each graph's sha256 and the preprocessing files against the manifest first
    (a swapped graph would be quantised and given a new checksum, hiding the swap); False skips it, on purpose."""
    if calib is not None and calibration is not None:
        raise TgedgeError("--calib and --calibration conflict: measure the ranges on data (--calib DIR) or reuse "
                          "saved ones (--calibration FILE), not both")
    if smooth is not None and smooth not in (AUTO, SEARCH) and not 0.0 <= smooth <= 1.0:
        raise TgedgeError(f"--smooth must be in [0, 1] (SmoothQuant's alpha), auto, search or none (got {smooth})")
    if outlier_channels not in OUTLIER_CHANNELS:
        raise TgedgeError(f"--outlier-channels must be {' or '.join(OUTLIER_CHANNELS)} (got {outlier_channels!r})")
    say = on_step or (lambda s: None)
    settings = {"block_size": block_size, "accuracy_level": accuracy_level}
    WeightOnly.of(WEIGHT_ONLY[0], **settings)  # settings refused before any work
    method_given = method
    if method is None:  # a saved file's ranges were measured one way: that is the method they quantise with
        method = read_calibration(calibration, [])["method"] if calibration is not None else "minmax"
    src = Manifest.load(export_dir)
    if verify:
        for graph in src.graphs:
            src.verify(graph, full=True)
        src.verify_files()
    plan = plan_quantization(src, precision, method)
    _refuse_ignored(plan, precision, calib, calibration, calib_limit, smooth, block_size, accuracy_level,
                    method_given, int8_attention, awq or outlier_channels == "fp32")
    weight_only = [g for g, p in plan.precisions.items() if p.weight_only]
    if outlier_channels == "fp32" and not plan.calibrated and not weight_only:
        raise TgedgeError(f"--outlier-channels fp32 splits int8 and weight-only graphs' MatMuls; --precision "
                          f"{precision} has none: leave it out")
    awq_graphs = [g for g, p in plan.precisions.items() if p.weight_only] if awq else []
    if awq and not awq_graphs:
        raise TgedgeError(f"--awq scales weight-only graphs ({', '.join(names(WEIGHT_ONLY))}); --precision {precision} "
                          "has none")
    ranges = calibrate(export_dir, plan.calibrated, method, calib, calibration, calib_limit, say, progress, smooth,
                       awq_graphs, verify=None, split=outlier_channels == "fp32",
                       split_weight_only=weight_only)  # verify: checked above
    exclude = exclude or []
    with atomic_dir(out, kind="export", inputs=[export_dir, calib, calibration], force=force) as tmp, \
            tempfile.TemporaryDirectory() as work:
        for key, name in src.files.items():
            shutil.copyfile(inside(src.directory, name, f"{src.directory}/manifest.json files.{key}"),
                            inside(tmp, name, f"manifest.json files.{key}"))
        rewrite = Rewrite(src, tmp, Path(work), ranges, exclude, settings, int8_attention, say)
        for graph, p in plan.precisions.items():
            rewrite.graph(graph, p)
        unused = [p for p in exclude if p not in rewrite.used_patterns]
        if unused:  # the user meant some nodes to stay fp32: a pattern that keeps none is a mistake, not a no-op
            raise TgedgeError(f"--exclude {unused[0]!r} matches no node that --precision {precision} quantises in "
                              f"any graph ({', '.join(plan.precisions)}): check the node names (tgedge inspect)")
        manifest, record = write_manifest(src, tmp, rewrite, precision, int8_attention)
    manifest.directory = Path(out)
    return QuantizeResult(Path(out), manifest, rewrite.reports, record)
