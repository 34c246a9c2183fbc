"""One decode step of a static-cache decoder graph as a bare onnxruntime session, for comparing graphs kernel by
kernel (docs/BENCHMARKS.md): tgedge's `decoder.onnx` (inputs_embeds) or onnxruntime-genai's `model.onnx`
(input_ids), each with its KV buffers bound once as past and present, a context of CONTEXT positions, 2 threads.
Prints the median step over 60 steps and, with --profile, the kernel time per op type (onnxruntime's profiler).

    python scripts/decode_step_profile.py GRAPH.onnx CONTEXT [--profile]
"""
import argparse
import collections
import json
import tempfile
from pathlib import Path
import time

import numpy as np
import onnxruntime as ort

parser = argparse.ArgumentParser()
parser.add_argument("graph")
parser.add_argument("context", type=int)
parser.add_argument("--profile", action="store_true")
parser.add_argument("--steps", type=int, default=60)
args = parser.parse_args()

options = ort.SessionOptions()
options.intra_op_num_threads = 2
if args.profile:
    options.enable_profiling = True
    options.profile_file_prefix = tempfile.mkdtemp() + "/step"
session = ort.InferenceSession(args.graph, options, providers=["CPUExecutionProvider"])
inputs = {i.name: i for i in session.get_inputs()}
pasts = [n for n in inputs if n.startswith("past_key_values.")]
binding, buffers = session.io_binding(), []
for name in pasts:
    _, heads, length, head_dim = inputs[name].shape
    if not isinstance(length, int):  # genai's graph: a buffer of the generation's length, the head size in its config
        length = args.context + 64
        head_dim = json.loads((Path(args.graph).parent / "genai_config.json").read_text())["model"]["decoder"][
            "head_size"]
    buffers.append(ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, length, head_dim), np.float32)))
    binding.bind_ortvalue_input(name, buffers[-1])
    binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buffers[-1])
binding.bind_output("logits", "cpu")
binding.bind_cpu_input("attention_mask", np.ones((1, args.context + 1), np.int64))
if "inputs_embeds" in inputs:
    width = inputs["inputs_embeds"].shape[-1]
    binding.bind_cpu_input("inputs_embeds", np.full((1, 1, width), 0.02, np.float32))
else:
    binding.bind_cpu_input("input_ids", np.array([[5]], np.int64))
for _ in range(5):
    session.run_with_iobinding(binding)
times = []
for _ in range(args.steps):
    start = time.perf_counter()
    session.run_with_iobinding(binding)
    times.append(time.perf_counter() - start)
print(f"{args.graph}: {args.context} positions, median step {np.median(times) * 1e3:.2f} ms")
if args.profile:
    events = json.load(open(session.end_profiling()))
    per_op, runs = collections.Counter(), sum(e.get("name") == "model_run" for e in events)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    for op, us in per_op.most_common(10):
        print(f"  {op:36s} {us / runs / 1e3:7.3f} ms per step")
