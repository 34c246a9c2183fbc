"""`tgedge bench`: per-stage latency, time to first token and decode speed of one or more models (and peers), run
side by side in one process, alternating; each figure next to its floor measured in the same run (tgedge.floors);
peak host memory; with `--power` the board's power (tegrastats or the INA3221 rails on Jetson, nvidia-smi elsewhere).
Reports: JSON, Markdown, a PNG chart.

Benchmarks are for the machine and the moment they run on: quote medians and ratios from runs made side by side,
with the load the machine carried (recorded with each run).

    targets   what is benched: a model on a backend (or a peer), opened; what the floors need of it
    run       one run (stages through `run_stage`, decoding through `tgedge.generate.generate`'s step hook), the bench
    peers     onnxruntime-genai (a worker process: genai_worker.py) and transformers' LLaVA generate
    samplers  board power and peak memory, sampled in a thread
    report    the runs summarised against their floors; Markdown, PNG, terminal lines
"""

from tgedge.bench.run import Settings, run_bench
from tgedge.bench.targets import Target

__all__ = ["Settings", "Target", "run_bench"]
