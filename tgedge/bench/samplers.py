"""What the bench samples in a thread while the models run: the board's power (tegrastats or the INA3221 rails on
Jetson, nvidia-smi elsewhere) and this process's peak resident memory."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import threading
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



class MemorySampler:
    """Peak resident memory of this process (host) while it runs, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> "MemorySampler":
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, self.rss())

