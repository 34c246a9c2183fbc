"""`tgedge device`: what this machine is and what it can run — GPU, CUDA, TensorRT, onnxruntime, and on a
Jetson the module, L4T / JetPack release, power mode and clocks. Torch-free; every probe is optional.

The Jetson parsers take text, so tests feed them recorded samples (tests/fixtures/jetson/).
"""

from __future__ import annotations

import json
import math
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
# L4T release -> JetPack (NVIDIA's release notes); the first match by prefix wins.
L4T_TO_JETPACK = [("36.4.4", "6.2.1"), ("36.4.3", "6.2"), ("36.4", "6.1"), ("36.3", "6.0"), ("36.2", "6.0 DP"),
                  ("35.6", "5.1.4"), ("35.5", "5.1.3"), ("35.4", "5.1.2"), ("35.3", "5.1.1"), ("35.2", "5.1"),
                  ("35.1", "5.0.2")]
# Jetson module -> memory (GB) and compute capability, for "does it fit" answers.
JETSON_MODULES = {"Orin Nano 4GB": 4, "Orin Nano 8GB": 8, "Orin NX 8GB": 8, "Orin NX 16GB": 16,
                  "AGX Orin 32GB": 32, "AGX Orin 64GB": 64}


@dataclass
class DeviceReport:
    machine: str
    os: str
    python: str
    gpus: list[dict] = field(default_factory=list)
    driver: str | None = None
    cuda: str | None = None
    tensorrt: dict = field(default_factory=dict)  # module name -> version
    onnxruntime: dict = field(default_factory=dict)  # version, providers
    jetson: dict = field(default_factory=dict)
    memory_gb: float | None = None
    can_run: dict = field(default_factory=dict)  # backend -> why / why not
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# -- Jetson parsers (text in, facts out) ---------------------------------------------------------------------
def parse_model(text: str) -> str:
    """/proc/device-tree/model is NUL-terminated."""
    return text.replace("\x00", "").strip()


def parse_tegra_release(text: str) -> dict:
    """'# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ...' -> L4T and JetPack."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not m:
        return {}
    l4t = f"{m.group(1)}.{m.group(2)}"
    jetpack = next((jp for prefix, jp in L4T_TO_JETPACK if l4t == prefix or l4t.startswith(prefix + ".")), None)
    board = re.search(r"BOARD:\s*([^,]+)", text)
    return {"l4t": l4t, "jetpack": jetpack, "board": board.group(1).strip() if board else None}


def parse_nvpmodel(text: str) -> dict:
    """`nvpmodel -q`: 'NV Power Mode: 15W' then the mode id."""
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    ids = re.findall(r"^\s*(\d+)\s*$", text, re.M)
    return {"power_mode": m.group(1) if m else None, "mode_id": int(ids[-1]) if ids else None}


def parse_tegrastats(line: str) -> dict:
    """One tegrastats line -> RAM (MB), GPU load (%), and each power rail (mW now / average)."""
    out: dict = {"rails_mw": {}}
    ram = re.search(r"RAM (\d+)/(\d+)MB", line)
    if ram:
        out["ram_used_mb"], out["ram_total_mb"] = int(ram.group(1)), int(ram.group(2))
    gpu = re.search(r"GR3D_FREQ (\d+)%", line)
    if gpu:
        out["gpu_load_pct"] = int(gpu.group(1))
    for name, now, avg in re.findall(r"\b([A-Z][A-Z0-9_]+) (\d+)mW/(\d+)mW", line):
        out["rails_mw"][name] = int(now)
    # The board's input rail is the total: VDD_IN (Orin Nano / NX), VIN_SYS_5V0 (AGX Orin) or POM_5V_IN.
    for total in ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN"):
        if total in out["rails_mw"]:
            out["total_mw"] = out["rails_mw"][total]
            break
    else:
        if out["rails_mw"]:
            out["total_mw"] = sum(out["rails_mw"].values())
    return out


def jetson_module(model: str, memory_gb: float | None) -> str | None:
    """'NVIDIA Jetson Orin Nano Developer Kit' + memory -> a JETSON_MODULES key."""
    for family in ("AGX Orin", "Orin NX", "Orin Nano"):
        if family.lower() in model.lower():
            sizes = sorted(v for k, v in JETSON_MODULES.items() if k.startswith(family))
            if memory_gb is None:
                return f"{family} {sizes[-1]}GB"
            fit = min(sizes, key=lambda s: abs(s - memory_gb))
            return f"{family} {fit}GB"
    return None


# -- probes -------------------------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _number(text: str) -> float | None:
    """A tool's figure, or None for what is not a finite number >= 0 ("[N/A]", "nan", "1e999", "-3")."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _compute_capability(text: str) -> str | None:
    return text if re.fullmatch(r"\d{1,2}\.\d{1,2}", text) else None


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def _gpus(report: DeviceReport) -> None:
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader,nounits"])
    if out:
        for line in out.strip().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 4:
                memory = _number(parts[1])
                report.gpus.append({"name": parts[0], "memory_mb": None if memory is None else int(memory),
                                    "compute_capability": _compute_capability(parts[3])})
                report.driver = parts[2] or None
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", _run(["nvidia-smi"]) or "")
        report.cuda = cuda.group(1) if cuda else None
        return
    from tgedge.runtime.tensorrt import device_info

    info = device_info()  # Jetson has no nvidia-smi on older JetPacks; cuda-python still answers
    if info:
        report.gpus.append({"name": info["name"], "memory_mb": None, "compute_capability": info["compute_capability"]})


def probe() -> DeviceReport:
    import importlib

    report = DeviceReport(machine=platform.machine(), os=platform.platform(), python=platform.python_version(),
                          memory_gb=_memory_gb())
    _gpus(report)
    for name in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"):
        try:
            report.tensorrt[name] = importlib.import_module(name).__version__
        except Exception:
            pass
    try:
        import onnxruntime as ort

        report.onnxruntime = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        pass
    if DEVICE_TREE_MODEL.exists():
        model = parse_model(DEVICE_TREE_MODEL.read_text(errors="replace"))
        if "jetson" in model.lower():
            report.jetson = {"model": model, "module": jetson_module(model, report.memory_gb)}
            if TEGRA_RELEASE.exists():
                report.jetson.update(parse_tegra_release(TEGRA_RELEASE.read_text(errors="replace")))
            q = _run(["nvpmodel", "-q"])
            if q:
                report.jetson.update(parse_nvpmodel(q))
            clocks = _run(["jetson_clocks", "--show"])
            if clocks:
                report.jetson["clocks"] = clocks.strip().splitlines()[:3]
            if report.jetson.get("jetpack") is None:
                report.notes.append("L4T release not recognised: see /etc/nv_tegra_release")
    providers = report.onnxruntime.get("providers", [])
    gpu = bool(report.gpus)
    report.can_run = {
        "onnxruntime": "yes (CPU)" if report.onnxruntime else "no: pip install onnxruntime",
        "onnxruntime-cuda": "yes" if "CUDAExecutionProvider" in providers else "no: needs onnxruntime-gpu and a GPU",
        "onnxruntime-trt": "yes" if "TensorrtExecutionProvider" in providers else "no: needs onnxruntime-gpu with TensorRT",
        "tensorrt": ("yes" if gpu and "tensorrt" in report.tensorrt else
                     "no: needs a GPU and the tensorrt module" + ("" if gpu else " (no GPU found)")),
        "build (tensorrt_rtx)": "yes, engines run on RTX GPUs (compute 8.0/8.6/8.9/12.x)"
        if any(k.startswith("tensorrt_rtx") for k in report.tensorrt) else "no",
    }
    cc = [g.get("compute_capability") for g in report.gpus]
    report.can_run["precisions"] = ("fp32, fp16, int8 (Q/DQ), int4w/int8w (onnxruntime)" if gpu and any(
        c and float(c) >= 7.5 for c in cc) else "fp32, fp16, int8, int4w/int8w on onnxruntime CPU")
    if not gpu:
        report.notes.append("no GPU found: onnxruntime CPU runs every precision; TensorRT engines need a GPU")
    return report


def to_json(report: DeviceReport) -> str:
    return json.dumps(report.to_dict(), indent=2)
