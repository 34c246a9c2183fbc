"""The `tgedge` command line. Each subcommand lives in a small function; heavy imports happen inside them."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tgedge import __version__
from tgedge.errors import TgedgeError

BACKENDS = ["torch", "onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt"]
EPILOG = "Exit codes: 0 ok, 1 a check failed, 2 bad input. Add --debug for a traceback."


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="answer a question about an image with a checkpoint",
        description="Answer a question about an image. The answer streams to stdout; --json prints one object "
                    "with text, tokens, prompt_tokens and timings instead.", epilog=EPILOG)
    p.add_argument("checkpoint", help="checkpoint directory (Hugging Face LLaVA, original TG-LLaVA or tgedge layout), "
                                      "`demo` for the embedded demo model, or an export directory (tgedge export)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="torch (the PyTorch reference; the default for a checkpoint) or a runtime backend for an "
                        "export directory (default onnxruntime, i.e. CPU)")
    p.add_argument("--image", required=True, help="image file (any format pillow reads)")
    p.add_argument("--prompt", required=True, help="the question; the model's chat template wraps it")
    p.add_argument("--raw", action="store_true", help="use --prompt verbatim (it must contain <image> once)")
    p.add_argument("--clip", metavar="DIR", help="transformers CLIPModel directory for original-layout checkpoints")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-context", type=int, help="KV-cache length (default: the model's max positions)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_run)


def open_pipeline(model: str, backend: str | None, clip: str | None = None, context: int | None = None):
    """A checkpoint runs on torch; an export directory (it has manifest.json) on a runtime backend."""
    from pathlib import Path

    is_export = (Path(model) / "manifest.json").exists()
    backend = backend or ("onnxruntime" if is_export else "torch")
    if backend == "torch":
        if is_export:
            raise TgedgeError(f"{model} is an export directory: the torch backend runs checkpoints "
                              "(pass the checkpoint, or pick a runtime backend)")
        from tgedge.reference import TorchPipeline

        return TorchPipeline.from_checkpoint(model, clip, context)
    if not is_export:
        raise TgedgeError(f"--backend {backend} runs an export directory (with manifest.json); {model} is not one "
                          f"(make one with: tgedge export {model} -o DIR)")
    from tgedge.runtime.pipeline import Pipeline

    return Pipeline(model, backend, context)


def cmd_run(args) -> int:
    pipe = open_pipeline(args.checkpoint, args.backend, args.clip, args.max_context)
    options = pipe.options(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed)
    stream = None if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    answer = pipe.answer(args.image, args.prompt, options, raw=args.raw, on_text=stream)
    if args.json:
        print(json.dumps(answer.to_dict()))
    else:
        print()
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="write task data folders (images + samples.jsonl)",
                       description="Write a data folder of the demo task (docs/DATA.md).", epilog=EPILOG)
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    s = kinds.add_parser("shapes", help="coloured shapes on a 3x3 grid with short-answer questions",
                         description="Pictures of 1-5 coloured shapes with questions about colour, position, count, "
                                     "presence and small details. The same split and seed give identical files.")
    s.add_argument("--split", choices=["train", "calibration", "eval"], default="eval",
                   help="which split's seed and default size (train 10000, calibration 256, eval 1000)")
    s.add_argument("--seed", type=int, help="another seed: a fresh set from the same distribution")
    s.add_argument("-n", "--count", type=int, help="number of samples (default: the split's size)")
    s.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    s.add_argument("-o", "--output", required=True, help="output folder (replaced if it exists)")
    s.set_defaults(func=cmd_data_shapes)


def cmd_data_shapes(args) -> int:
    from tqdm import tqdm

    from tgedge.data import shapes
    from tgedge.data.folder import write_folder

    seed = shapes.SPLIT_SEEDS[args.split] if args.seed is None else args.seed
    count = shapes.SPLIT_SIZES[args.split] if args.count is None else args.count
    if count < 1 or args.size < 24:
        raise TgedgeError(f"need --count >= 1 and --size >= 24 (got {count}, {args.size})")
    with tqdm(total=count, desc=f"shapes/{args.split}", unit="sample", disable=None) as bar:
        out = write_folder(shapes.generate(seed, count, args.size), args.output, progress=bar.update)
    print(f"wrote {count} samples (split {args.split}, seed {seed}) to {out}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="task accuracy of a model on a data folder",
                       description="Greedy answers for every sample of a data folder, exact match against its "
                                   "answers: overall and per question type, with the majority-answer chance level "
                                   "and the first 20 failures.", epilog=EPILOG)
    p.add_argument("model", help="checkpoint directory, `demo` for the embedded demo model, or an export directory")
    p.add_argument("--data", required=True, help="data folder (images/ + samples.jsonl)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="torch for a checkpoint (default), a runtime backend for an export directory (default onnxruntime)")
    p.add_argument("--limit", type=int, help="evaluate the first N samples only")
    p.add_argument("--clip", metavar="DIR", help="CLIPModel directory for original-layout checkpoints")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length cap (default 8)")
    p.add_argument("--ablate", choices=["fom", "dp", "both"],
                   help="switch TG modules off at inference: fom zeroes TG-FOM's zero_layer, dp drops TG-DP's tokens")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from tgedge.data.folder import read_folder
    from tgedge.evaluate import evaluate
    from tgedge.reference import TorchPipeline

    records = read_folder(args.data)[: args.limit]
    pipe = open_pipeline(args.model, args.backend, args.clip)
    if args.ablate:
        if not isinstance(pipe, TorchPipeline):
            raise TgedgeError("--ablate switches modules of the PyTorch reference: pass a checkpoint")
        pipe.ablate(args.ablate)
    options = pipe.options(max_new_tokens=args.max_new_tokens)
    answer = lambda image, prompt: pipe.answer(image, prompt, options).text  # noqa: E731
    with tqdm(total=len(records), desc="eval", unit="sample", disable=None, file=sys.stderr) as bar:
        report = evaluate(answer, records, progress=bar.update)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.model} on {args.data}")
    for col in ("type", "n", "accuracy", "chance"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for kind, r in report.per_type.items():
        table.add_row(kind, str(r["n"]), f"{100 * r['accuracy']:.1f}%", f"{100 * r['chance']:.1f}%")
    table.add_row("all", str(report.total), f"{100 * report.accuracy:.1f}%", f"{100 * report.chance:.1f}%")
    console = Console()
    console.print(table)
    for f in report.failures:
        console.print(f"  line {f['line']} {f['image']}: {f['prompt']!r} expected {f['expected']!r} got {f['got']!r}",
                      markup=False)
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX graphs + manifest.json",
                       description="One ONNX graph per runtime stage (text_guide, vision, fusion, embed, decoder) with "
                                   "symbolic dims, standard ops only (attention as MatMul/Softmax), plus manifest.json "
                                   "and the tokenizer/preprocessing files: the directory is all the runtime needs. "
                                   "Each graph is checked against torch at two shapes on onnxruntime CPU; exit 1 if "
                                   "one is out of tolerance.", epilog=EPILOG)
    p.add_argument("model", help="checkpoint directory, or `demo` for the embedded demo model")
    p.add_argument("-o", "--output", required=True, help="export directory to write (replaced if it exists)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17: what JetPack 6's TensorRT 10.3 parses)")
    p.add_argument("--max-context", type=int,
                   help="longest prompt + answer the runtime will run (default: the model's max positions, at most "
                        "4096); sets TensorRT profiles and memory estimates")
    p.add_argument("--clip", metavar="DIR", help="CLIPModel directory for original-layout checkpoints")
    p.add_argument("--external-data", choices=["auto", "always", "never"], default="auto",
                   help="weights in <graph>.onnx.data: auto (graphs over 512 MB), always, never")
    p.add_argument("--json", action="store_true", help="print the result (graphs, checks, seconds) as JSON")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from tgedge.export.onnx_export import export_model

    external = {"auto": None, "always": True, "never": False}[args.external_data]
    say = None if args.json else (lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    result = export_model(args.model, args.output, args.opset, args.max_context, args.clip, external, on_step=say)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0 if result.passed else 1
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"graphs vs torch on onnxruntime CPU (max abs diff of each output)")
    for col in ("graph", "dims", "outputs", "max abs diff", "limit", "ok"):
        table.add_column(col, justify="right" if col in ("max abs diff", "limit") else "left")
    rows: dict[tuple, list] = {}
    for c in result.checks:  # one row per graph and dim setting; the worst output's figure
        rows.setdefault((c.graph, tuple(c.dims.items())), []).append(c)
    for (graph, dims), checks in rows.items():
        worst = max(checks, key=lambda c: c.max_abs - c.limit)
        table.add_row(graph, " ".join(f"{k}={v}" for k, v in dims), str(len(checks)), f"{worst.max_abs:.2e}",
                      f"{worst.limit:.2e}", "yes" if all(c.passed for c in checks) else "NO")
    Console().print(table)
    m = result.manifest
    print(f"wrote {len(m.graphs)} graphs (opset {m.opset}, max context {m.max_context}) and manifest.json to "
          f"{result.directory}")
    if not result.passed:
        print("tgedge: export check failed: a graph differs from torch beyond its tolerance", file=sys.stderr)
        return 1
    return 0


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
    p.add_argument("-o", "--output", required=True, help="output export directory (replaced if it exists)")
    p.add_argument("--calib", metavar="DIR", help="calibration data folder (images/ + samples.jsonl), e.g. "
                                                   "`tgedge data shapes --split calibration -o DIR`")
    p.add_argument("--calibration", metavar="FILE", help="reuse a calibration.json instead of --calib data")
    p.add_argument("--calib-limit", type=int, help="use the first N calibration samples")
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax",
                   help="activation range calibration (default minmax; docs/QUANTIZATION.md compares them)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep nodes whose name matches this glob in fp32, e.g. '/layers.0/*' (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from tqdm import tqdm

    from tgedge.calibration.quantize import quantize_export

    if args.calib_limit is not None and args.calib_limit < 1:
        raise TgedgeError(f"--calib-limit must be >= 1 (got {args.calib_limit})")
    say = (lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    with tqdm(desc="calibrate", unit="sample", disable=None, file=sys.stderr, total=args.calib_limit) as bar:
        result = quantize_export(args.export_dir, args.output, args.precision, args.calib, args.method, args.exclude,
                                 args.calibration, args.calib_limit, on_step=say, progress=bar.update)
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
    p.add_argument("-o", "--output", required=True, help="engine directory: a copy of the export + <graph>.engine")
    p.add_argument("--backend", choices=["tensorrt", "tensorrt_rtx"], default="tensorrt",
                   help="tensorrt (JetPack / PyPI TensorRT, default) or tensorrt_rtx (TensorRT for RTX)")
    p.add_argument("--timing-cache", metavar="F", help="timing cache file: read if present, written after the build")
    p.add_argument("--workspace", type=int, default=1024, metavar="MB", help="builder workspace limit (default 1024)")
    p.add_argument("--graph", action="append", dest="graphs", metavar="NAME", help="build only this graph (repeatable)")
    p.add_argument("--json", action="store_true", help="print engines, metadata and commands as JSON")
    p.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    from tgedge.export.tensorrt_build import build_engines

    say = None if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    result = build_engines(args.export_dir, args.output, args.backend, args.workspace, args.timing_cache,
                           args.graphs, on_step=say)
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
    p.add_argument("--limit", type=int, help="the first N samples only")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length cap (default 8)")
    p.add_argument("--json", metavar="F", help="write the report as JSON (per-stage figures, limits, breaches)")
    p.add_argument("--junit", metavar="F", help="write JUnit XML (one test case per stage) for CI")
    p.add_argument("--markdown", metavar="F", help="write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)")
    p.set_defaults(func=cmd_validate)


def _write(path: str, text: str) -> None:
    import os
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)


HEADLINE = ("max_abs", "min_cosine", "top1", "kl_max", "exact_match", "reference", "runtime", "drop_points")


def cmd_validate(args) -> int:
    from tgedge.validate import validate

    report = validate(args.export_dir, args.data, args.reference, args.backend, args.policy, args.limit,
                      args.max_new_tokens, args.clip)
    if args.json:
        _write(args.json, json.dumps(report.to_dict(), indent=2) + "\n")
    if args.junit:
        _write(args.junit, report.to_junit())
    if args.markdown:
        _write(args.markdown, report.to_markdown())
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


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="what an ONNX graph, export directory or TensorRT engine holds; does it fit",
                       description="Inputs/outputs, op histogram, parameters and bytes per dtype, quantisation "
                                   "coverage (MatMul/Gemm/Conv behind Q/DQ or MatMulNBits, fp32 islands in fp16 "
                                   "graphs); for an export directory also the manifest/graph agreement and a memory "
                                   "estimate (weights + KV cache + activations at the max context) against Jetson "
                                   "Orin modules; for an engine its metadata and, where this TensorRT can load it, "
                                   "per-layer precision and tactics.", epilog=EPILOG)
    p.add_argument("path", help="an .onnx file, an export/engine directory, or a .engine file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from tgedge.inspect import inspect_path

    report = inspect_path(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    graphs = report["graphs"] if report["kind"] == "export" else {Path_name(args.path): report} \
        if report["kind"] == "onnx" else {}
    if graphs:
        table = Table(title=f"{args.path}")
        for col in ("graph", "precision", "opset", "nodes", "MatMul/Gemm/Conv", "behind Q/DQ", "MatMulNBits",
                    "fp32 islands", "params", "weights MB"):
            table.add_column(col, justify="left" if col in ("graph", "precision") else "right")
        for name, g in graphs.items():
            table.add_row(name, g["precision"], str(g["opset"]), str(sum(g["ops"].values())), str(g["compute_ops"]),
                          str(g["qdq_wrapped"]), str(g["matmul_nbits"]), str(sum(g["fp32_islands"].values())),
                          f"{sum(g['params'].values()):,}", f"{g['weight_bytes'] / 1e6:.2f}")
        console.print(table)
        for name, g in graphs.items():
            ins = ", ".join(f"{t['name']} {t['dtype']} {tuple(t['shape'])}" for t in g["inputs"])
            outs = ", ".join(f"{t['name']} {t['dtype']} {tuple(t['shape'])}" for t in g["outputs"])
            console.print(f"[bold]{name}[/bold] in: {ins}\n  out: {outs}", markup=True, highlight=False)
    if report["kind"] == "export":
        mem = report["memory"]
        console.print(f"memory at max context {mem['max_context']}: weights {mem['weights_bytes'] / 1e6:.1f} MB, "
                      f"KV cache {mem['kv_cache_bytes'] / 1e6:.1f} MB, activations {mem['activations_bytes'] / 1e6:.1f} "
                      f"MB (estimate)", highlight=False)
        for device, f in mem["devices"].items():
            verdict = "fits" if f["fits"] else "does not fit"
            console.print(f"  {device}: {verdict}, needs {f['needs_gb']} GB of {f['usable_gb']} GB usable",
                          highlight=False)
        for m in report["mismatches"]:
            console.print(f"[red]mismatch[/red]: {m}", highlight=False)
        if report["engines"]:
            for graph, e in report["engines"].items():
                console.print(f"engine {graph}: {e['file']} {e['precision']} {e['backend']} {e['tensorrt_version']} "
                              f"GPU {e['gpu'] or 'none'} compute {e['compute_capability'] or '?'}", highlight=False)
        return 1 if report["mismatches"] else 0
    if report["kind"] == "engine":
        console.print(f"{report['path']}: {report['bytes'] / 1e6:.2f} MB; metadata: {report['metadata']}",
                      highlight=False)
        if report["layers"]:
            console.print(f"layers: {report['layers']['layers']}, precisions: {report['layers']['precisions']}")
        else:
            console.print(f"per-layer information: {report.get('layers_unavailable')}", highlight=False)
    return 0


def Path_name(path: str) -> str:
    from pathlib import Path

    return Path(path).stem


def _add_device(sub) -> None:
    p = sub.add_parser("device", help="this machine: GPU, CUDA, TensorRT, onnxruntime, Jetson module and power mode",
                       description="What this machine is and which backends and precisions it can run. On Jetson "
                                   "also the module, L4T / JetPack release, power mode (nvpmodel) and clocks. Without "
                                   "a GPU it says so and reports the rest.", epilog=EPILOG)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_device)


def cmd_device(args) -> int:
    from tgedge.device import probe, to_json

    report = probe()
    if args.json:
        print(to_json(report))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tgedge device", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    gpus = "; ".join(f"{g['name']} (compute {g['compute_capability']}, {g['memory_mb'] or '?'} MB)"
                     for g in report.gpus) or "no GPU found"
    rows = [("machine", f"{report.machine}, {report.os}"), ("python", report.python),
            ("memory", f"{report.memory_gb} GB"), ("GPU", gpus), ("driver / CUDA", f"{report.driver} / {report.cuda}"),
            ("TensorRT", ", ".join(f"{k} {v}" for k, v in report.tensorrt.items()) or "not installed"),
            ("onnxruntime", f"{report.onnxruntime.get('version')} ({', '.join(report.onnxruntime.get('providers', []))})")]
    rows += [(f"jetson {k}", str(v)) for k, v in report.jetson.items()]
    rows += [(f"can run: {k}", v) for k, v in report.can_run.items()]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency and tokens/s of a model on a backend (medians), optional power",
                       description="Answer the same question --runs times after --warmup runs, each generating exactly "
                                   "--new-tokens tokens, and report medians of encode (preprocess + vision + fusion), "
                                   "prefill, decode and total, and decode tokens/s. --power samples board power "
                                   "(tegrastats / INA3221 on Jetson, nvidia-smi on desktops) and reports average W and "
                                   "energy per generated token. Compare backends in one session on one machine.",
                       epilog=EPILOG)
    p.add_argument("model", help="checkpoint, `demo`, or an export/engine directory")
    p.add_argument("--backend", choices=BACKENDS, help="default: torch for a checkpoint, onnxruntime for an export")
    p.add_argument("--image", help="image file (default: a generated shapes image)")
    p.add_argument("--prompt", help="the question (default: the generated image's question)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run (EOS ignored)")
    p.add_argument("--power", action="store_true", help="sample board power during the timed runs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from tqdm import tqdm

    from tgedge.bench import bench

    pipe = open_pipeline(args.model, args.backend)
    image, prompt = args.image, args.prompt
    if image is None:
        from tgedge.data import shapes

        sample = next(iter(shapes.generate(shapes.SPLIT_SEEDS["eval"], 1)))
        image, prompt = sample.image, prompt or sample.prompt
    if prompt is None:
        raise TgedgeError("--prompt is needed with --image")
    backend = args.backend or ("torch" if type(pipe).__name__ == "TorchPipeline" else "onnxruntime")
    with tqdm(total=args.runs, desc="bench", unit="run", disable=None, file=sys.stderr) as bar:
        result = bench(pipe, args.model, backend, image, prompt, args.runs, args.warmup, args.new_tokens,
                       args.power, progress=bar.update)
    d = result.to_dict()
    if args.json:
        print(json.dumps(d))
        return 0
    med = d["median_s"]
    print(f"{args.model} on {backend}: {result.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, "
          f"median of {args.runs} runs")
    print(f"  encode {1e3 * med['preprocess_encode_s']:.1f} ms | prefill {1e3 * med['prefill_s']:.1f} ms | "
          f"decode {1e3 * med['decode_s']:.1f} ms ({d['decode_tokens_per_s']} tok/s) | total {1e3 * med['total_s']:.1f} ms")
    if result.power:
        p = result.power
        print(f"  power ({p['source']}, {p['samples']} samples): {p['average_w']} W average, "
              f"{p['energy_per_token_j']} J per generated token")
    return 0


def _add_train_demo(sub) -> None:
    p = sub.add_parser("train-demo", help="train the small demo TG-LLaVA from scratch on the shapes task",
                       description="Staged training (towers on dense labels, then answers) of the demo model; "
                                   "seeded, data generated on the fly. Writes a checkpoint in tgedge's layout with "
                                   "train_log.jsonl. The defaults are the shipped model's command (58 min on 2 CPU cores).",
                       epilog=EPILOG)
    p.add_argument("-o", "--output", required=True, help="output checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vision-steps", type=int, default=4000, help="stage-1 steps (towers on dense labels)")
    p.add_argument("--answer-steps", type=int, default=4500, help="stage-2 steps (answers)")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vision-lr-scale", type=float, default=0.1,
                   help="stage 2 fine-tunes the vision tower at lr x this (0 freezes it; default 0.1)")
    p.add_argument("--no-tg", action="store_true", help="ablation: train plain LLaVA (no TG-FOM/TG-DP) on the same budget")
    p.set_defaults(func=cmd_train_demo)


def cmd_train_demo(args) -> int:
    from pathlib import Path

    from tgedge.train_demo import TrainSettings, train_demo

    cfg = TrainSettings(seed=args.seed, vision_steps=args.vision_steps, answer_steps=args.answer_steps,
                        batch=args.batch, lr=args.lr, vision_lr_scale=args.vision_lr_scale)
    if min(cfg.vision_steps, cfg.answer_steps, cfg.batch) < 1:
        raise TgedgeError("--vision-steps, --answer-steps and --batch must be >= 1")
    out = train_demo(Path(args.output), cfg, ablate_tg=args.no_tg)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tgedge", description="Export, quantise, run and validate text-guided vision-language models "
                                   "(TG-LLaVA family) for NVIDIA Jetson and desktop GPUs.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"tgedge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    _add_data(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_quantize(sub)
    _add_build(sub)
    _add_validate(sub)
    _add_inspect(sub)
    _add_device(sub)
    _add_bench(sub)
    _add_train_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="tgedge: %(message)s")
    try:
        return args.func(args)
    except TgedgeError as e:
        if args.debug:
            raise
        print(f"tgedge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tgedge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
