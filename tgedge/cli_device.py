"""CLI commands for the device: inspect, device, bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tgedge.cli_common import BACKENDS, EPILOG, integer, open_pipeline, text
from tgedge.errors import TgedgeError


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
    graphs = report["graphs"] if report["kind"] == "export" else {Path(args.path).stem: report} \
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
    p.add_argument("--clip", metavar="DIR", help="CLIPModel directory for original-layout checkpoints")
    p.add_argument("--image", help="image file (default: a generated shapes image)")
    p.add_argument("--prompt", type=text, help="the question (default: the generated image's question)")
    p.add_argument("--runs", type=integer(1, 100_000), default=10, help="timed runs (default 10)")
    p.add_argument("--warmup", type=integer(0, 100_000), default=2, help="untimed runs first (default 2)")
    p.add_argument("--new-tokens", type=integer(2), default=16,
                   help="tokens generated per run, EOS ignored (default 16; must fit the context after the prompt)")
    p.add_argument("--power", action="store_true", help="sample board power during the timed runs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from tqdm import tqdm

    from tgedge.bench import bench

    pipe = open_pipeline(args.model, args.backend, args.clip)
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
    print(f"{args.model} on {backend}: {result.prompt_tokens} prompt tokens, {d['generated_tokens']} new tokens, "
          f"median of {args.runs} runs")
    print(f"  encode {1e3 * med['preprocess_encode_s']:.1f} ms | prefill {1e3 * med['prefill_s']:.1f} ms | "
          f"decode {1e3 * med['decode_s']:.1f} ms ({d['decode_tokens_per_s']} tok/s) | total {1e3 * med['total_s']:.1f} ms")
    if result.power:
        p = result.power
        print(f"  power ({p['source']}, {p['samples']} samples): {p['average_w']} W average, "
              f"{p['energy_per_token_j']} J per generated token")
    return 0


def register(sub) -> None:
    for add in (_add_inspect, _add_device, _add_bench):
        add(sub)
