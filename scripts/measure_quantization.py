"""Measure every precision of the demo model on onnxruntime CPU: the figures in docs/QUANTIZATION.md.

    .venv/bin/python scripts/measure_quantization.py [--out out/quant] [--eval-samples 1000] [--validate-samples 200]
        [--only VARIANT ...]

For each variant: task accuracy on the eval split (`tgedge eval`, exact match) and `tgedge validate` against the
fp32 PyTorch reference with the shipped policy. Writes OUT/results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tgedge.cli import main as tgedge

VARIANTS = [  # name, tgedge quantize arguments (None: the fp32 export itself)
    ("fp32", None),
    ("fp16", ["--precision", "fp16"]),
    ("int8 minmax", ["--precision", "int8", "--method", "minmax"]),  # --smooth auto, the default
    ("int8 minmax, smooth none", ["--precision", "int8", "--method", "minmax", "--smooth", "none"]),
    ("int8 minmax, smooth 0.5", ["--precision", "int8", "--method", "minmax", "--smooth", "0.5"]),
    ("int8 minmax, attention int8", ["--precision", "int8", "--method", "minmax", "--int8-attention"]),
    ("int8 entropy", ["--precision", "int8", "--method", "entropy"]),
    ("int8 percentile", ["--precision", "int8", "--method", "percentile"]),
    ("int8w decoder", ["--precision", "int8w"]),
    ("int4w decoder", ["--precision", "int4w"]),
]


def run(argv: list[str]) -> None:
    print("$ tgedge " + " ".join(argv), flush=True)
    code = tgedge(argv)
    if code not in (0, 1):
        sys.exit(code)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/quant")
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--validate-samples", type=int, default=200)
    ap.add_argument("--only", action="append", metavar="VARIANT",
                    help="measure this variant only (repeatable; fp32 is always measured: the table's baseline)")
    args = ap.parse_args()
    unknown = set(args.only or []) - {name for name, _ in VARIANTS}
    if unknown:
        ap.error(f"unknown variant(s) {sorted(unknown)}: choose from {[name for name, _ in VARIANTS]}")
    out = Path(args.out)
    run(["data", "shapes", "--split", "eval", "-n", str(args.eval_samples), "-o", str(out / "eval")])
    run(["data", "shapes", "--split", "calibration", "-o", str(out / "calibration")])
    run(["export", "demo", "-o", str(out / "fp32"), "--json"])
    results = {}
    for name, qargs in VARIANTS:
        if args.only and name != "fp32" and name not in args.only:
            continue
        d = out / name.replace(",", "").replace(" ", "-")
        start = time.perf_counter()
        if qargs is not None:
            calib = ["--calib", str(out / "calibration")] if "int8" in qargs else []
            run(["quantize", str(out / "fp32"), *qargs, *calib, "-o", str(d), "--json"])
        quantize_s = time.perf_counter() - start
        report = out / f"{d.name}.eval.json"  # reports beside the export: never inside an input
        with open(report, "w") as f:
            sys.stdout, saved = f, sys.stdout
            try:
                tgedge(["eval", str(d), "--data", str(out / "eval"), "--json"])
            finally:
                sys.stdout = saved
        accuracy = json.loads(report.read_text())
        run(["validate", str(d), "--data", str(out / "eval"), "--limit", str(args.validate_samples),
             "--json", str(out / f"{d.name}.validate.json")])
        validation = json.loads((out / f"{d.name}.validate.json").read_text())
        results[name] = {"accuracy": accuracy["accuracy"],
                         "per_type": {k: v["accuracy"] for k, v in accuracy["per_type"].items()},
                         "validate_passed": validation["passed"], "summary": validation["summary"],
                         "stages": {k: v["figures"] for k, v in validation["stages"].items()},
                         "quantize_s": round(quantize_s, 1),
                         "bytes": sum(p.stat().st_size for p in d.glob("*.onnx*"))}
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    base = results["fp32"]["accuracy"]
    print(f"\n| variant | accuracy ({args.eval_samples}) | vs fp32 | validate ({args.validate_samples}) | "
          "decoder top-1 | decoder KL max | vision min cos | graphs MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        s = r["stages"]
        print(f"| {name} | {100 * r['accuracy']:.1f}% | {100 * (r['accuracy'] - base):+.1f} | "
              f"{'pass' if r['validate_passed'] else 'FAIL'} | {s['decoder']['top1']:.4f} | "
              f"{s['decoder']['kl_max']:.2g} | {s['vision']['min_cosine']:.5f} | {r['bytes'] / 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
