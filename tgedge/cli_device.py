"""CLI commands for the device: inspect, device."""

from __future__ import annotations

import json
from pathlib import Path

from tgedge.cli_common import EPILOG


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
    from tgedge.inspection import inspect_path

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


def register(sub) -> None:
    for add in (_add_inspect, _add_device):
        add(sub)
