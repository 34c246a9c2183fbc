"""`tgedge bench`: latency and throughput of one model on one backend, medians over repeated runs, and with
`--power` the board's power while it runs (tegrastats or the INA3221 rails on Jetson, nvidia-smi elsewhere).

Benchmarks are for the machine they run on: quote medians and ratios from runs made side by side.
"""

from __future__ import annotations

import math
import re
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tgedge.device import parse_tegrastats
from tgedge.errors import TgedgeError

INA_ROOT = Path("/sys/bus/i2c/drivers/ina3221")


class PowerSampler:
    """Samples total board power (mW) in a thread; `source` says from where."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self.samples: list[float] = []
        self.source = self._pick_source()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    @staticmethod
    def ina_rails() -> list[tuple[str, Path, Path]]:
        """(label, voltage mV file, current mA file) of each INA3221 channel."""
        rails = []
        for label in sorted(INA_ROOT.glob("*/hwmon/hwmon*/in*_label")):
            n = re.search(r"in(\d+)_label", label.name).group(1)
            volt, curr = label.with_name(f"in{n}_input"), label.with_name(f"curr{n}_input")
            if volt.exists() and curr.exists():
                rails.append((label.read_text().strip(), volt, curr))
        return rails

    def _pick_source(self) -> str:
        if shutil.which("tegrastats"):
            return "tegrastats"
        if self.ina_rails():
            return "ina3221"
        if shutil.which("nvidia-smi"):
            return "nvidia-smi"
        raise TgedgeError("--power: no power source on this machine (tegrastats, INA3221 rails in sysfs or nvidia-smi)")

    def _read_ina(self) -> float | None:
        rails = self.ina_rails()
        total = [r for r in rails if r[0] in ("VDD_IN", "VIN_SYS_5V0")] or rails
        try:
            return sum(int(v.read_text()) * int(c.read_text()) / 1000 for _, v, c in total)
        except (OSError, ValueError):  # a rail that vanished or reads oddly: skip this sample
            return None

    def _add(self, mw) -> None:
        """Keep a reading only if it is a power at all (a finite number >= 0)."""
        if mw is not None and math.isfinite(mw) and mw >= 0:
            self.samples.append(float(mw))

    def _loop(self) -> None:
        if self.source == "ina3221":
            while not self._stop.wait(self.interval_ms / 1000):
                self._add(self._read_ina())
            return
        cmd = (["tegrastats", "--interval", str(self.interval_ms)] if self.source == "tegrastats" else
               ["nvidia-smi", "--query-gpu=power.draw", "--format=csv,noheader,nounits", "-lms", str(self.interval_ms)])
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                      errors="replace")
        for line in self._proc.stdout:
            if self._stop.is_set():
                break
            if self.source == "tegrastats":
                mw = parse_tegrastats(line).get("total_mw")
            else:
                try:
                    mw = float(line.strip().split(",")[0]) * 1000
                except ValueError:
                    mw = None
            self._add(mw)

    def __enter__(self) -> "PowerSampler":
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
        self._thread.join(timeout=5)


@dataclass
class BenchResult:
    model: str
    backend: str
    runs: int
    new_tokens: int
    prompt_tokens: int
    seconds: dict[str, list[float]] = field(default_factory=dict)
    power: dict | None = None
    generated: list[int] = field(default_factory=list)  # tokens each timed run really generated

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.seconds.items()}

    def to_dict(self) -> dict:
        med = self.medians()
        tokens = min(self.generated, default=self.new_tokens)
        out = {"model": self.model, "backend": self.backend, "runs": self.runs, "new_tokens": self.new_tokens,
               "generated_tokens": tokens,
               "prompt_tokens": self.prompt_tokens, "median_s": {k: round(v, 6) for k, v in med.items()},
               "decode_tokens_per_s": round((tokens - 1) / med["decode_s"], 2) if med.get("decode_s") else None,
               "all_s": {k: [round(x, 6) for x in v] for k, v in self.seconds.items()}}
        if self.power is not None:
            out["power"] = self.power
        return out


def bench(pipe, model: str, backend: str, image, prompt: str, runs: int = 10, warmup: int = 2,
          new_tokens: int = 16, power: bool = False, progress=None) -> BenchResult:
    """Every run generates exactly `new_tokens` (EOS and stop strings off) so that runs compare; a count the
    context cannot hold after the prompt is refused, and the tokens really generated are what rates use."""
    if runs < 1 or warmup < 0 or new_tokens < 2:
        raise TgedgeError("need --runs >= 1, --warmup >= 0 and --new-tokens >= 2")
    context, pre = getattr(pipe, "context", None), getattr(pipe, "pre", None)
    if context is not None and pre is not None:
        prompt_len = int(pre(image, prompt).input_ids.shape[1])
        if prompt_len + new_tokens > context:
            raise TgedgeError(f"--new-tokens {new_tokens} does not fit: the prompt is {prompt_len} tokens and the "
                              f"context {context} leaves room for {max(context - prompt_len, 0)}")
    options = pipe.options(max_new_tokens=new_tokens, eos_token_ids=[], stop_strings=[])
    sampler = PowerSampler() if power else None  # before the warm-up: a missing source fails fast
    for _ in range(warmup):
        pipe.answer(image, prompt, options)
    result = BenchResult(model, backend, runs, new_tokens, 0)
    start = time.perf_counter()
    if sampler:
        sampler.__enter__()
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            answer = pipe.answer(image, prompt, options)
            total = time.perf_counter() - t0
            result.prompt_tokens = answer.prompt_tokens
            result.generated.append(len(answer.tokens))
            for key in ("preprocess_encode_s", "prefill_s", "decode_s"):
                result.seconds.setdefault(key, []).append(answer.timings[key])
            result.seconds.setdefault("total_s", []).append(total)
            if progress:
                progress()
    finally:
        if sampler:
            sampler.__exit__(None, None, None)
    elapsed = time.perf_counter() - start
    if sampler:
        if not sampler.samples:
            raise TgedgeError(f"--power: {sampler.source} gave no readings during the run")
        avg_w = statistics.fmean(sampler.samples) / 1000
        result.power = {"source": sampler.source, "samples": len(sampler.samples), "average_w": round(avg_w, 3),
                        "energy_j": round(avg_w * elapsed, 3),
                        "energy_per_token_j": round(avg_w * elapsed / max(sum(result.generated), 1), 4)}
    return result
