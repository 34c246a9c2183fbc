"""`make demo`: the main job end to end on the embedded demo model, printing each step and where outputs are."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from tgedge import demo_checkpoint
from tgedge.cli import main as tgedge

OUT = Path("out/demo")
EVAL_SAMPLES = 200


STEPS = 6


def step(n: int, title: str, argv: list[str]) -> None:
    print(f"\n== {n}/{STEPS} {title}\n$ tgedge {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    code = tgedge(argv)
    if code:
        sys.exit(code)
    print(f"   ({time.perf_counter() - start:.1f}s)", flush=True)


def main() -> int:
    ckpt = demo_checkpoint()
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    print(f"embedded demo model: {ckpt} ({size / 1e6:.1f} MB; docs/DEMO_MODEL.md)")
    data = OUT / "eval"
    step(1, f"write {EVAL_SAMPLES} samples of the shapes task's eval split",
         ["data", "shapes", "--split", "eval", "-n", str(EVAL_SAMPLES), "-o", str(data)])
    first = json.loads((data / "samples.jsonl").read_text().splitlines()[0])
    step(2, f"answer one question (expected: {first['answer']!r})",
         ["run", "demo", "--image", str(data / first["image"]), "--prompt", first["prompt"]])
    step(3, "task accuracy with the PyTorch reference", ["eval", "demo", "--data", str(data)])
    fp32 = OUT / "export-fp32"
    step(4, "export to ONNX (one graph per stage + manifest.json), each graph checked against torch",
         ["export", "demo", "-o", str(fp32)])
    step(5, "the same question on the torch-free runtime (onnxruntime CPU)",
         ["run", str(fp32), "--backend", "onnxruntime", "--image", str(data / first["image"]), "--prompt",
          first["prompt"]])
    reports = OUT / "reports"
    step(6, "validate the export against the reference, stage by stage (the CI drift gate)",
         ["validate", str(fp32), "--data", str(data), "--json", str(reports / "fp32.json"),
          "--junit", str(reports / "fp32.xml"), "--markdown", str(reports / "fp32.md")])
    print(f"\nOutputs are under {OUT}/: eval/ (data), export-fp32/ (graphs + manifest.json), reports/ (validate)."
          "\nQuantisation (fp16 / int8 / int4) and TensorRT engines arrive with issue 6.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
