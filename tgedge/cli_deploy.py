"""CLI commands of the deployment flow: export, quantize, build, validate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tgedge.cli_common import BACKENDS, EPILOG, add_output, integer, opset, real
from tgedge.contract import CACHE_MODES, DEFAULT_TARGET, TARGETS
from tgedge.errors import TgedgeError
from tgedge.fileio import check_output, check_report, distinct_reports, write_atomic
from tgedge.precision import EXPORT_DTYPES, REFERENCE, WEIGHT_ONLY, names


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX graphs + manifest.json",
                       description="One ONNX graph per runtime stage (text_guide, vision, fusion, embed, decoder) with "
                                   "symbolic dims, standard ops only (attention as MatMul/Softmax), plus manifest.json "
                                   "and the tokenizer/preprocessing files: the directory is all the runtime needs. "
                                   "Memory stays bounded by one graph: weights are read from the checkpoint for the "
                                   "graph being written, the embed and decoder graphs tensor by tensor (a 7 B "
                                   "checkpoint exports on a 24 GB machine). Each graph is checked against torch at "
                                   "two shapes on onnxruntime CPU by relative error (skipped, and said, where torch "
                                   "and onnxruntime cannot both hold it); exit 1 if one is out of tolerance.",
                       epilog=EPILOG)
    p.add_argument("model", help="checkpoint directory, or `demo` for the embedded demo model")
    add_output(p, "export directory to write")
    p.add_argument("--opset", type=opset, default=17,
                   help="ONNX opset, 14 to the newest the installed exporter writes (torch 2.13 + onnx 1.23: 23; "
                        "default 17: what JetPack 6's TensorRT 10.3 parses)")
    p.add_argument("--max-context", type=integer(1),
                   help="longest prompt + answer the runtime will run (default: the model's max positions, at most "
                        "4096); sets TensorRT profiles and memory estimates")
    p.add_argument("--clip", metavar="DIR", help="CLIPModel directory for original-layout checkpoints")
    p.add_argument("--external-data", choices=["auto", "always", "never"], default="auto",
                   help="weights in <graph>.onnx.data: auto (graphs over 512 MB), always, never")
    p.add_argument("--dtype", choices=names(EXPORT_DTYPES), default=REFERENCE.name,
                   help="weights and compute of every graph (fp16 keeps norms, softmax and positions in fp32, and "
                        "stores the KV cache in fp16); default fp32, the precision tgedge quantize starts from")
    p.add_argument("--decoder-weights", choices=names(WEIGHT_ONLY),
                   help="write the decoder's linear weights as int4/int8 blocks (onnxruntime MatMulNBits) while "
                        "streaming them: what tgedge quantize --precision int4w makes from an fp32 export, without "
                        "ever holding the fp32 decoder (a 7 B model on a 24 GB machine)")
    _add_weight_only(p)
    p.add_argument("--target", choices=list(TARGETS),
                   help="where the export will run, which picks its KV cache: onnxruntime (CPU/CUDA: the static "
                        "cache, the fastest decode, batched across requests by tgedge serve), tensorrt (TensorRT "
                        "10.15+ / TensorRT for RTX: static-onnx), jetpack6 (JetPack 6's TensorRT 10.3: growing, "
                        f"opset-17 ops every backend runs). Default {DEFAULT_TARGET}")
    p.add_argument("--cache", choices=list(CACHE_MODES),
                   help="the decoder's KV cache, in place of --target's: growing (past + new concatenated each step, "
                        "opset-17 ops: every backend, JetPack 6's TensorRT 10.3 included); static (one buffer per "
                        "layer at --max-context, bound as both past and present and written in place by onnxruntime's "
                        "GroupQueryAttention: the fast decode on onnxruntime CPU/CUDA; TensorRT cannot run it); "
                        "static-onnx (the same buffers in standard opset-24 ops, TensorScatter writing in place and "
                        "Attention: TensorRT 10.15+ / TensorRT for RTX as its KVCacheUpdate and attention layers, "
                        "and onnxruntime)")
    p.add_argument("--no-check", action="store_true", help="skip the torch-vs-onnxruntime check of each graph")
    p.add_argument("--json", action="store_true", help="print the result (graphs, checks, seconds) as JSON")
    p.set_defaults(func=cmd_export)


def _add_weight_only(p) -> None:
    from tgedge.calibration.weight_only import ACCURACY_LEVEL, ACCURACY_LEVELS, BLOCK_SIZE, BLOCK_SIZES

    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, metavar="N",
                   help=f"int4w/int8w: MatMulNBits block along K ({', '.join(map(str, BLOCK_SIZES))}; default "
                        f"{BLOCK_SIZE})")
    p.add_argument("--accuracy-level", type=int, choices=ACCURACY_LEVELS, metavar="L",
                   help=f"int4w/int8w: MatMulNBits accuracy_level (0: fp32 activations, 4: int8 activations, what "
                        f"CPUs with int8 dot products run fastest; default {ACCURACY_LEVEL}; docs/BENCHMARKS.md)")


def cmd_export(args) -> int:
    from tgedge import resolve_checkpoint
    from tgedge.export.onnx_export import export_model

    if args.target and args.cache:
        raise TgedgeError(f"--target {args.target} and --cache {args.cache}: --target picks the cache "
                          f"({TARGETS[args.target]}); give one of them")
    check_output(args.output, "export", [resolve_checkpoint(args.model), args.clip], args.force)
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    say = None if args.json else (lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    result = export_model(args.model, args.output, args.opset, args.max_context, args.clip, external, on_step=say,
                          force=args.force, dtype=args.dtype, check=not args.no_check,
                          decoder_weights=args.decoder_weights, cache_mode=args.cache or "growing",
                          target=None if args.cache else args.target or DEFAULT_TARGET,
                          block_size=args.block_size,
                          accuracy_level=args.accuracy_level)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0 if result.passed else 1
    from rich.console import Console
    from rich.table import Table

    table = Table(title="graphs vs torch on onnxruntime CPU (the worst output: relative L2 error, max abs diff)")
    for col in ("graph", "dims", "outputs", "rel. error", "limit", "max abs", "ok"):
        table.add_column(col, justify="right" if col in ("rel. error", "limit", "max abs") else "left")
    rows: dict[tuple, list] = {}
    for c in result.checks:  # one row per graph and dim setting; the worst output's figure
        rows.setdefault((c.graph, tuple(c.dims.items())), []).append(c)
    for (graph, dims), checks in rows.items():
        worst = max(checks, key=lambda c: c.rel_l2 / c.limit if not c.skipped else -1)
        if worst.skipped:
            table.add_row(graph, "-", str(len(checks)), "-", f"{worst.limit:.0e}", "-", f"skipped: {worst.skipped}")
            continue
        ok = "yes" if all(c.passed for c in checks) else "NO"
        table.add_row(graph, " ".join(f"{k}={v}" for k, v in dims), str(len(checks)), f"{worst.rel_l2:.2e}",
                      f"{worst.limit:.0e}", f"{worst.max_abs:.2e}", f"{ok}, {worst.scope}" if worst.scope else ok)
    Console().print(table)
    m = result.manifest
    from tgedge.export.decoder_graph import ATTENTION

    mode = m.contract.cache.mode
    decoder_opset = ATTENTION[mode].OPSET
    opset = f"opset {m.opset}" + (f", the {mode} decoder's {decoder_opset}" if decoder_opset != m.opset else "")
    print(f"wrote {len(m.graphs)} graphs ({opset}, max context {m.max_context}) and manifest.json to "
          f"{result.directory}")
    if not result.passed:
        print("tgedge: export check failed: a graph differs from torch beyond its tolerance", file=sys.stderr)
        return 1
    return 0


def smooth_alpha(value: str) -> float | str | None:
    word = value.strip().lower()
    if word in ("none", "auto", "search"):
        return None if word == "none" else word
    try:
        return real(0.0, 1.0)(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (SmoothQuant's alpha), or auto, search or none") from None


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="fp16 / int8 (calibrated Q/DQ) / int4w / int8w copies of an fp32 export",
                       description="Write a new export directory with quantised graphs and an updated manifest. "
                                   "PRECISION is one of fp16, int8 (every graph), int4w, int8w (the decoder's "
                                   "weights), or one per graph: vision=fp16,fusion=fp16,decoder=int8 (graphs not "
                                   "named stay fp32). int8 calibrates on the real inputs of every graph while the "
                                   "fp32 export answers the --calib samples, and saves the ranges as "
                                   "calibration.json (reuse them with --calibration).", epilog=EPILOG)
    p.add_argument("export_dir", help="an fp32 export directory (tgedge export)")
    p.add_argument("--precision", required=True, metavar="P", help="fp16 | int8 | int4w | int8w | GRAPH=P,...")
    add_output(p, "output export directory")
    ranges = p.add_mutually_exclusive_group()  # measured on data or reused: never both, one silently ignored
    ranges.add_argument("--calib", metavar="DIR", help="calibration data folder (images/ + samples.jsonl), e.g. "
                                                        "`tgedge data shapes --split calibration -o DIR`")
    ranges.add_argument("--calibration", metavar="FILE", help="reuse a calibration.json instead of --calib data")
    p.add_argument("--calib-limit", type=integer(1), help="use the first N calibration samples")
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default=None,
                   help="activation range calibration (default minmax, or the method a --calibration file was "
                        "measured with; minmax: ranges folded while the samples run, "
                        "memory of the graphs alone; entropy / percentile keep every graph's recorded inputs, "
                        "which grows with --calib samples; docs/QUANTIZATION.md compares them)")
    p.add_argument("--int8-attention", action="store_true",
                   help="int8: also quantise the MatMuls between two activations (attention's Q K^T and P V), "
                        "which stay fp32 by default (docs/QUANTIZATION.md has the measurement)")
    p.add_argument("--smooth", type=smooth_alpha, default="auto", metavar="ALPHA|auto|search|none",
                   help="int8: SmoothQuant with this alpha in [0, 1] before quantising (activation outlier channels "
                        "moved into the weights, folded into the norms and up projections: the graph keeps its ops); "
                        "default auto: alpha 0.5 on the MatMul inputs whose calibration shows outlier channels (the "
                        "largest channel >= 8x the median), the others untouched; search: every foldable input, "
                        "its alpha (or none) chosen from 0, 0.1, ..., 1 by the least expected int8 output error; "
                        "none: off (docs/QUANTIZATION.md has the measurements)")
    p.add_argument("--outlier-channels", choices=["int8", "fp32"], default="int8",
                   help="int8: fp32 computes each MatMul input's outlier channels (calibrated max |x| >= 8x the "
                        "median channel's, a few per input) in fp32 beside the int8 MatMul, as LLM.int8() does "
                        "(Mul by a mask, Gather, a small fp32 MatMul, Add: ops TensorRT parses), so that the int8 "
                        "range is the other channels'; default int8: left to --smooth (docs/QUANTIZATION.md has the "
                        "measurements)")
    p.add_argument("--awq", action="store_true",
                   help="int4w / int8w: activation-aware scales (AWQ-style) before the weight blocks, from the --calib "
                        "samples' per-channel statistics (folded into the norms and up projections)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep nodes whose name matches this glob in fp32, e.g. '/layers.0/*' (repeatable)")
    _add_weight_only(p)
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the export's graphs (sha256) and preprocessing files against its manifest "
                        "before quantising (on purpose: a graph edited by hand)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from tqdm import tqdm

    from tgedge.calibration.quantize import quantize_export

    check_output(args.output, "export", [args.export_dir, args.calib, args.calibration], args.force)
    say = (lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    with tqdm(desc="calibrate", unit="sample", disable=None, file=sys.stderr, total=args.calib_limit) as bar:
        result = quantize_export(args.export_dir, args.output, args.precision, args.calib, args.method, args.exclude,
                                 args.calibration, args.calib_limit, on_step=say, progress=bar.update,
                                 force=args.force, block_size=args.block_size, accuracy_level=args.accuracy_level,
                                 int8_attention=args.int8_attention, smooth=args.smooth, awq=args.awq,
                                 verify=not args.no_verify, outlier_channels=args.outlier_channels)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.directory}")
    for col in ("graph", "precision", "quantised ops", "kept fp32", "note"):
        table.add_column(col)
    for graph, r in result.reports.items():
        d = r.to_dict()
        table.add_row(graph, d["precision"], str(d["quantized_nodes"]), str(d["fp32_nodes"]), d["note"])
    Console().print(table)
    if result.calibration:
        c = result.calibration
        print(f"calibration: {c['method']} on {c['data']['samples']} samples of {c['data']['path']} "
              f"-> {result.directory}/calibration.json")
    print(f"wrote {result.directory}; check it with: tgedge validate {result.directory} --data DIR")
    return 0


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="build TensorRT engines from an export directory",
                       description="One engine per graph with the TensorRT Python API (8.6, 10.x, 11.x, or TensorRT "
                                   "for RTX): strongly typed networks where the library has them (the export's "
                                   "precision decides: fp16 export -> fp16 engines, Q/DQ -> int8), optimisation "
                                   "profiles from the manifest's min/opt/max (the decoder: prefill and decode), a "
                                   "timing cache reused across builds. Engines are not portable: build on the device "
                                   "that runs them (docs/JETSON.md). Prints the equivalent trtexec line per graph.",
                       epilog=EPILOG)
    p.add_argument("export_dir", help="export directory (tgedge export / tgedge quantize)")
    add_output(p, "engine directory: a copy of the export + <graph>.engine")
    p.add_argument("--backend", choices=["tensorrt", "tensorrt_rtx"], default="tensorrt",
                   help="tensorrt (JetPack / PyPI TensorRT, default) or tensorrt_rtx (TensorRT for RTX)")
    p.add_argument("--timing-cache", metavar="F", help="timing cache file: read if present, written after the build")
    p.add_argument("--workspace", type=integer(1, 1 << 20), default=1024, metavar="MB",
                   help="builder workspace limit, 1 MB to 1 TB (default 1024)")
    p.add_argument("--graph", action="append", dest="graphs", metavar="NAME", help="build only this graph (repeatable)")
    p.add_argument("--max-batch", type=integer(1, 256), default=1, metavar="N",
                   help="requests an engine serves in one call (1 to 256; default 1: one user, the least memory): "
                        "the decoder decodes up to N sequences per step (tgedge serve's in-flight batching, N slots; "
                        "a static-cache export: --target tensorrt), vision takes N images' views")
    p.add_argument("--json", action="store_true", help="print engines, metadata and commands as JSON")
    p.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    from tgedge.export.tensorrt_build import build_engines

    check_output(args.output, "engines", [args.export_dir, args.timing_cache], args.force)
    # the timing cache is read and then replaced: never a file of the export (--timing-cache E/manifest.json)
    check_report(args.timing_cache, "--timing-cache", [args.export_dir], what="the timing cache")
    say = None if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    result = build_engines(args.export_dir, args.output, args.backend, args.workspace, args.timing_cache,
                           args.graphs, on_step=say, force=args.force, max_batch=args.max_batch)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    for graph, meta in result.engines.items():
        print(f"{graph}: {meta['file']} ({meta['bytes'] / 1e6:.1f} MB, {meta['precision']}, {meta['build_s']:.1f}s, "
              f"{meta['backend']} {meta['tensorrt_version']}, GPU {meta['gpu'] or 'none'})")
        print(f"  equivalent: {result.commands[graph]}")
    print(f"wrote {result.directory}; run it with: tgedge run {result.directory} --backend tensorrt ...")
    return 0


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="compare an export on a runtime backend with the PyTorch reference",
                       description="Every sample through the runtime and the torch fp32 reference, stage by stage "
                                   "(preprocess, text_guide, vision, fusion, embed, decoder logits under teacher "
                                   "forcing), then greedy answers and task accuracy, judged by a policy. Exit 1 when "
                                   "a stage is out of budget (the report names the first), 2 on bad input.",
                       epilog=EPILOG)
    p.add_argument("export_dir", help="export directory (tgedge export / tgedge quantize)")
    p.add_argument("--data", required=True, help="data folder (images/ + samples.jsonl; docs/DATA.md)")
    p.add_argument("--reference", metavar="MODEL", help="reference checkpoint (default: the one the export was made from)")
    p.add_argument("--clip", metavar="DIR", help="CLIPModel directory for an original-layout reference")
    p.add_argument("--backend", choices=BACKENDS[1:], default="onnxruntime", help="runtime backend (default onnxruntime)")
    p.add_argument("--policy", metavar="FILE", help="TOML limits laid over the defaults (tgedge/policies/default.toml)")
    p.add_argument("--limit", type=integer(1), help="the first N samples only")
    p.add_argument("--max-new-tokens", type=integer(1), default=8, help="answer length cap (default 8)")
    p.add_argument("--json", metavar="F", help="write the report as JSON (per-stage figures, limits, breaches)")
    p.add_argument("--junit", metavar="F", help="write JUnit XML (one test case per stage) for CI")
    p.add_argument("--markdown", metavar="F", help="write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the gate's own checks: each graph's sha256 against manifest.json and the precision each "
                        "graph really has against its label (a swapped graph would be judged by the wrong policy)")
    p.set_defaults(func=cmd_validate)


HEADLINE = ("max_abs", "noise_ratio", "min_cosine", "top1", "kl_max", "exact_match", "reference", "runtime", "drop_points")


def cmd_validate(args) -> int:
    from tgedge.validate import validate

    inputs = [args.export_dir, args.data, args.reference, args.clip, args.policy]
    reports = [(args.json, "--json"), (args.junit, "--junit"), (args.markdown, "--markdown")]
    for path, flag in reports:
        check_report(path, flag, inputs)
    distinct_reports(reports)
    report = validate(args.export_dir, args.data, args.reference, args.backend, args.policy, args.limit,
                      args.max_new_tokens, args.clip, verify=not args.no_verify)
    if args.json:
        write_atomic(args.json, json.dumps(report.to_dict(), indent=2) + "\n")
    if args.junit:
        write_atomic(args.junit, report.to_junit())
    if args.markdown:
        write_atomic(args.markdown, report.to_markdown())
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.export_dir} ({args.backend}) vs {report.reference}, {report.samples} samples")
    for col in ("stage", "precision", "figures", "limits", "result"):
        table.add_column(col)
    for s in report.stages:
        shown = {k: v for k, v in s.figures.items() if k in HEADLINE}  # the rest is in --json
        table.add_row(s.name, s.precision, ", ".join(f"{k} {v:.3g}" for k, v in shown.items()),
                      ", ".join(f"{k} {v:g}" for k, v in s.limits.items()) or "-",
                      "pass" if s.passed else "[red]FAIL[/red] " + "; ".join(s.breaches))
    console = Console()
    console.print(table)
    console.print(report.summary(), markup=False)
    return 0 if report.passed else 1


def register(sub) -> None:
    for add in (_add_export, _add_quantize, _add_build, _add_validate):
        add(sub)
