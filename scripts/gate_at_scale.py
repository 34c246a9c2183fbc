"""The drift gate at real scale, both ways: a checkpoint's fp32 (and fp16) export must PASS `tgedge validate` with the
defaults, each planted defect (tgedge.defects) must FAIL naming its stage. Every step is a `tgedge` command run under
`/usr/bin/time -v` (wall time and peak RSS recorded).

    python scripts/gate_at_scale.py CHECKPOINT --clip DIR --work DIR [--samples N] [--dtypes fp32,fp16]
        [--defect-samples N] [--defects all|none|a,b] [--json F]

Writes WORK/<dtype> exports (kept, reused when present), WORK/data (N shapes eval samples), WORK/defect-<name>
(removed after its validate) and prints one line per step: verdict, first failing stage, per-stage noise ratio and
margin (limit / figure) of the decisive limit.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tgedge.defects import DEFECTS, plant

TGEDGE = [sys.executable, "-m", "tgedge"]


def timed(cmd: list[str], log: Path) -> dict:
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(int(rss.group(1)) / 2**20, 2) if rss else None, "log": str(log)}


def judged(report: Path) -> dict:
    r = json.loads(report.read_text())
    stages = {}
    for name, s in r["stages"].items():
        f, m = s["figures"], s.get("margins", {})
        stages[name] = {k: f[k] for k in ("noise", "max_rel_l2", "noise_ratio", "top1", "kl_max", "min_cosine",
                                           "exact_match") if k in f}
        stages[name].update(passed=s["passed"], margins=m, breaches=s["breaches"])
    return {"passed": r["passed"], "first_failure": r["first_failure"], "stages": stages}


def validate(export: Path, data: Path, ckpt: str, clip: str, report: Path, work: Path, limit: int) -> dict:
    """Reused when its report is there (delete WORK/<step>.json to run it again)."""
    if report.exists():
        return {"rc": None, "seconds": None, "peak_rss_gib": None, "reused": True, **judged(report)}
    cmd = [*TGEDGE, "validate", str(export), "--data", str(data), "--reference", ckpt, "--clip", clip,
           "--json", str(report), "--limit", str(limit)]
    out = timed(cmd, work / f"{report.stem}.log")
    if report.exists():
        out.update(judged(report))
    return out


def line(name: str, r: dict) -> str:
    verdict = "PASS" if r.get("passed") else f"FAIL at {r.get('first_failure')}"
    ratios = ", ".join(f"{s} {v['noise_ratio']:.3g}" for s, v in r.get("stages", {}).items() if "noise_ratio" in v)
    return (f"{name:24s} {verdict:22s} noise ratio: {ratios}  "
            + ("(reused)" if r.get("reused") else f"({r['seconds']} s, {r['peak_rss_gib']} GiB)"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--clip", required=True)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--defect-samples", type=int, default=1, help="samples a defect's validate runs (default 1)")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--defects", default="all")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"checkpoint": args.checkpoint, "samples": args.samples, "steps": {}}
    data = work / "data"
    if not data.exists():
        subprocess.check_call([*TGEDGE, "data", "shapes", "-o", str(data), "--split", "eval", "-n", str(args.samples)])
    for dtype in args.dtypes.split(","):
        export = work / dtype
        if not (export / "manifest.json").exists():
            step = timed([*TGEDGE, "export", args.checkpoint, "--clip", args.clip, "-o", str(export), "--dtype", dtype],
                         work / f"export-{dtype}.log")
            results["steps"][f"export {dtype}"] = step
            print(f"export {dtype}: rc {step['rc']} ({step['seconds']} s, {step['peak_rss_gib']} GiB)", flush=True)
            if step["rc"]:
                return 1
        r = validate(export, data, args.checkpoint, args.clip, work / f"validate-{dtype}.json", work, args.samples)
        results["steps"][f"validate {dtype}"] = r
        print(line(f"validate {dtype}", r), flush=True)
    defects = [] if args.defects == "none" else list(DEFECTS) if args.defects == "all" else args.defects.split(",")
    for defect in defects:
        broken = work / f"defect-{defect}"
        if broken.exists():
            shutil.rmtree(broken)
        report = work / f"validate-{defect}.json"
        if report.exists():
            r = validate(broken, data, args.checkpoint, args.clip, report, work, args.defect_samples)
            r.update(defect="(reused)", expected_stage=DEFECTS[defect], caught=r.get("first_failure") == DEFECTS[defect])
            results["steps"][f"defect {defect}"] = r
            print(line(f"defect {defect}", r), flush=True)
            continue
        what = plant(work / "fp32", broken, defect)
        r = validate(broken, data, args.checkpoint, args.clip, report, work, args.defect_samples)
        r.update(defect=what, expected_stage=DEFECTS[defect], caught=r.get("first_failure") == DEFECTS[defect])
        results["steps"][f"defect {defect}"] = r
        print(line(f"defect {defect}", r) + f"  [{what}]", flush=True)
        shutil.rmtree(broken)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
