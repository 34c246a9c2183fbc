"""Per stage: the fp32 reference's own noise (against float64) beside an export's drift from the fp32 reference.

    python scripts/noise_floor.py EXPORT_DIR DATA_DIR [--limit N] [--reference CKPT] [--clip DIR] [--json F]

Prints, per stage, max over samples of rel_l2(reference fp32, reference float64) ("noise") and of
rel_l2(runtime, reference fp32) ("drift"), and drift / noise. Evidence for tgedge.drift's fp32 limits.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("data")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--reference")
    ap.add_argument("--clip")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()

    from tgedge.checkpoint import load_model
    from tgedge.data.folder import read_folder
    from tgedge.generate import forced_logits
    from tgedge.drift import rel_l2
    from tgedge.noise import forced_logits_exact, stage_exact
    from tgedge.reference import TorchPipeline
    from tgedge.runtime.pipeline import Pipeline
    from tgedge.validate import _Traced, source_checkpoint

    rows: dict[str, dict[str, float]] = {}

    def note(stage, key, value):
        rows.setdefault(stage, {"noise": 0.0, "drift": 0.0})
        rows[stage][key] = max(rows[stage][key], value)

    start = time.perf_counter()
    with Pipeline(args.export, "onnxruntime") as rt:
        model, ckpt = load_model(args.reference or source_checkpoint(rt.manifest), args.clip)
        ref = TorchPipeline(model, ckpt.preprocessor, rt.context)
        for record in read_folder(args.data)[:args.limit]:
            inputs = ref.pre(record.image, record.prompt)
            traced = _Traced(ref)
            x = traced.embeddings(inputs)
            for name, feed, want in traced.calls:
                got, exact = rt.run_stage(name, feed), stage_exact(model, name, feed)
                for out, value in want.items():
                    note(name, "noise", rel_l2(value, exact[out]))
                    note(name, "drift", rel_l2(got[out], value))
            answer = ref.answer_inputs(inputs, ref.options(max_new_tokens=args.max_new_tokens))
            want = forced_logits(ref, x, answer.tokens)
            note("decoder", "noise", rel_l2(want, forced_logits_exact(model, np.asarray(x), answer.tokens)))
            note("decoder", "drift", rel_l2(forced_logits(rt, x, answer.tokens), want))
    for stage, r in rows.items():
        r["ratio"] = r["drift"] / r["noise"] if r["noise"] else float("inf") if r["drift"] else 0.0
        print(f"{stage:10s} noise {r['noise']:.3e}  drift {r['drift']:.3e}  drift/noise {r['ratio']:.2f}")
    print(f"({args.limit} samples, {time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
