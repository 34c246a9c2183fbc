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


STEPS = 10
GATED_SAMPLES = 50


def step(n: int, title: str, argv: list[str]) -> None:
    print((f"\n== {n}/{STEPS} {title}\n" if title else "") + f"$ tgedge {shlex.join(argv)}", flush=True)
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
    calib = OUT / "calibration"
    int8 = OUT / "export-int8"
    step(7, "quantise to int8 (Q/DQ), calibrated on images + prompts of the calibration split",
         ["data", "shapes", "--split", "calibration", "-n", "128", "-o", str(calib)])
    step(7, "", ["quantize", str(fp32), "--precision", "int8", "--calib", str(calib), "-o", str(int8)])
    step(8, "validate the int8 export: its drift, stage by stage, against the int8 policy",
         ["validate", str(int8), "--data", str(data), "--json", str(reports / "int8.json"),
          "--junit", str(reports / "int8.xml"), "--markdown", str(reports / "int8.md")])
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except ImportError:
        print(f"\n== 9/{STEPS} TensorRT engines: skipped (TensorRT for RTX is not installed here)")
    else:
        jetson, jetson_int8 = OUT / "export-jetpack6", OUT / "export-jetpack6-int8"
        step(9, "TensorRT engines, int8: the export for JetPack 6's TensorRT 10.3 (growing KV cache, opset 17; the "
                "default above is onnxruntime's static cache), quantised as above, then built (TensorRT for RTX "
                "builds without a GPU; run them on an RTX GPU, or build on the Jetson)",
             ["export", "demo", "-o", str(jetson), "--target", "jetpack6"])
        step(9, "", ["quantize", str(jetson), "--precision", "int8", "--calib", str(calib), "-o", str(jetson_int8)])
        step(9, "", ["build", str(jetson_int8), "-o", str(OUT / "engines-int8"), "--backend", "tensorrt_rtx"])
    gated = OUT / "export-gated"
    step(10, "the second fusion family, gated cross-modal fusion (demo-gated): one answer, then its fp32 export "
             f"validated on {GATED_SAMPLES} samples",
         ["run", "demo-gated", "--image", str(data / first["image"]), "--prompt", first["prompt"]])
    step(10, "", ["export", "demo-gated", "-o", str(gated)])
    step(10, "", ["validate", str(gated), "--data", str(data), "--limit", str(GATED_SAMPLES),
                  "--json", str(reports / "gated-fp32.json")])
    print(f"\nOutputs are under {OUT}/: eval/ and calibration/ (data), export-fp32/ and export-int8/ (graphs + "
          "manifest.json), export-jetpack6*/ and engines-int8/ (TensorRT), export-gated/ (the gated family), "
          "reports/ (validate: JSON, "
          "JUnit, Markdown).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
