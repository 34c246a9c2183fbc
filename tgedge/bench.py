"""`tgedge bench`: per-stage latency, time to first token and decode speed of one or more models (and peers), run
side by side in one process, alternating; each figure next to its floor measured in the same run (tgedge.floors);
peak host memory; with `--power` the board's power (tegrastats or the INA3221 rails on Jetson, nvidia-smi elsewhere).
Reports: JSON, Markdown, a PNG chart (tgedge.bench_report).

Benchmarks are for the machine and the moment they run on: quote medians and ratios from runs made side by side,
with the load the machine carried (recorded with each run).
"""

from __future__ import annotations

import json
import math
import os
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


# -- what one run measures ----------------------------------------------------------------------------------------
ENCODE_STAGES = ("text_guide", "vision", "fusion", "embed")
STAGES = ("preprocess", *ENCODE_STAGES, "prefill", "decode_token")  # per-stage medians and p90, in this order


def stats(values: list[float]) -> dict:
    """Median and 90th percentile (nearest rank) of a list of seconds."""
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
            "n": len(ordered)}


class StageClock:
    """Seconds spent in each stage a pipeline runs through its `run_stage` while the clock is on."""

    def __init__(self, pipe):
        self.pipe, self.seconds = pipe, {}

    def __enter__(self) -> "StageClock":
        inner = self.pipe.run_stage

        def timed(name, feed, **options):
            start = time.perf_counter()
            try:
                return inner(name, feed, **options)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        self.pipe.run_stage = timed  # the instance's attribute: StageFlow calls self.run_stage
        return self

    def __exit__(self, *exc) -> None:
        del self.pipe.run_stage


def _decode(pipe, x, new_tokens: int, out: dict, start: float) -> None:
    """Greedy decoding of exactly `new_tokens` (EOS ignored): prefill, TTFT from `start`, each decode step."""
    import numpy as np

    t = x.shape[1]
    pipe.setup_cache(t + new_tokens)
    try:
        s = time.perf_counter()
        token = int(np.argmax(pipe.prefill(x)))
        end = time.perf_counter()
        out["prefill"], out["ttft"], out["decode_token"] = end - s, end - start, []
        for i in range(new_tokens - 1):
            s = time.perf_counter()
            token = int(np.argmax(pipe.decode_one_token(token, t + i)))
            out["decode_token"].append(time.perf_counter() - s)
    finally:
        pipe.clear_cache()


def image_run(pipe, image, prompt: str, new_tokens: int) -> dict:
    """One question about an image, stage by stage: preprocess, text guide, vision (all views), fusion, embed,
    prefill, then `new_tokens - 1` decode steps; TTFT = preprocess through the first token."""
    start = time.perf_counter()
    inputs = pipe.pre(image, prompt)
    out = {"preprocess": time.perf_counter() - start, "load": os.getloadavg()[0]}
    with StageClock(pipe) as clock:
        x = pipe.embeddings(inputs)
    out.update(clock.seconds)
    out["prompt_tokens"] = int(x.shape[1])
    out["views"] = int(inputs.pixel_values.shape[0] + (0 if inputs.crops is None else inputs.crops.shape[1]))
    _decode(pipe, x, new_tokens, out, start)
    return out


def context_run(pipe, prompt_tokens: int, new_tokens: int) -> dict:
    """Text only: a prompt of `prompt_tokens` token ids (every id a text token), prefill, then decode steps."""
    from tgedge.bench_genai import ids_for  # the token ids the onnxruntime-genai peer is given too

    ids = ids_for(prompt_tokens, _vocab(pipe))[None]
    out = {"load": os.getloadavg()[0], "prompt_tokens": prompt_tokens}
    start = time.perf_counter()
    with StageClock(pipe) as clock:
        x = pipe.embed_tokens(ids)
    out.update(clock.seconds)
    _decode(pipe, x, new_tokens, out, start)
    return out


def _vocab(pipe) -> int:
    return int(pipe.contract.stages["decoder"].outputs[0].shape[-1])


# -- what is benched: a target opens a pipeline -------------------------------------------------------------------
@dataclass
class Target:
    """A model on a backend: `open()` gives a pipeline (tgedge's runtime or its torch reference)."""
    name: str
    model: str
    backend: str
    clip: str | None = None
    kind: str = "tgedge"  # or torch (the reference), genai (onnxruntime-genai), transformers (its LLaVA generate)
    info: dict = field(default_factory=dict)  # precision, cache mode, weight bytes, KV bytes per position, config
    threads: int = 0  # intra-op threads (0: the library's default): onnxruntime's, or torch's (process-wide)
    spin: bool = True  # onnxruntime's idle threads spin

    def open(self, text_only: bool = False):
        """`text_only`: an export's embed and decoder graphs alone (text-only prompts need no more)."""
        from tgedge.cli_common import open_pipeline

        if self.kind == "genai":
            return GenaiPeer(self.model, self.clip, self.threads)  # clip: the worker's python
        if self.kind in ("torch", "transformers") and self.threads:
            import torch

            torch.set_num_threads(self.threads)  # process-wide: torch has no per-model setting
        if self.kind == "transformers":
            from tgedge.bench_transformers import TransformersPeer

            return TransformersPeer(self.model, self.clip)
        if self.kind == "tgedge" and (text_only or self.threads or not self.spin):
            from tgedge.runtime.backends import make_runner
            from tgedge.runtime.onnxrt import DEVICES, OnnxRuntimeRunner, SessionFromOnnx
            from tgedge.runtime.pipeline import Pipeline

            device = {"onnxruntime": "cpu", "onnxruntime-cuda": "cuda", "onnxruntime-trt": "trt"}.get(self.backend)

            def runner(manifest, graph):
                if device in DEVICES:
                    return OnnxRuntimeRunner(SessionFromOnnx(manifest.graph_path(graph), device, self.threads,
                                                             spin=self.spin), graph)
                return make_runner(self.backend, manifest, graph)

            return Pipeline(self.model, self.backend, runner_factory=runner,
                            stages=("embed", "decoder") if text_only else None)
        return open_pipeline(self.model, self.backend, self.clip)


class GenaiPeer:
    """onnxruntime-genai over its builder's output (`python -m onnxruntime_genai.models.builder -i HF_DIR -o DIR -p
    fp32|int4 -e cpu`), in a worker process of `python` (an environment with onnxruntime_genai: it brings its own
    onnxruntime); text-only prompts, the same token ids as tgedge's text-only runs (tgedge/bench_genai.py)."""
    separate_process = True  # its memory is the worker's, not this process's

    def __init__(self, model_dir: str, python: str, threads: int = 0):
        self.model_dir = model_dir
        worker = Path(__file__).with_name("bench_genai.py")
        try:
            # isolated (-I): neither the working directory nor tgedge/ (whose inspect.py would shadow the standard
            # library's) on its path
            run = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
            self.proc = subprocess.Popen([python, "-I", "-c", run, str(worker), model_dir, str(threads)],
                                         stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise TgedgeError(f"--genai-python {python}: cannot start it ({e.strerror})") from None
        ready = self.proc.stdout.readline()
        if not ready:
            err = self.proc.stderr.read().strip().splitlines()
            raise TgedgeError(f"onnxruntime-genai worker ({python}) failed: {err[-1] if err else 'no output'}")

    def bench_run(self, settings: "Settings") -> dict:
        out = {}
        for n in settings.prompt_tokens:
            self.proc.stdin.write(json.dumps({"prompt_tokens": n, "new_tokens": settings.new_tokens}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise TgedgeError(f"onnxruntime-genai worker stopped: {self.proc.stderr.read().strip()[-300:]}")
            out[f"context:{n}"] = json.loads(line)
        return out

    def describe(self) -> dict:
        from tgedge.floors import graph_weight_bytes, kv_bytes_per_position

        cfg = json.loads((Path(self.model_dir) / "genai_config.json").read_text())["model"]
        dec = cfg["decoder"]
        onnx_file = Path(self.model_dir) / dec["filename"]
        return {"precision": "int4" if "int4" in str(self.model_dir) or _has_nbits(onnx_file) else "fp32",
                "cache": "static (onnxruntime-genai)", "weight_bytes": graph_weight_bytes(onnx_file),
                "kv_per_position": kv_bytes_per_position(dec["num_hidden_layers"], dec["num_key_value_heads"],
                                                         dec["head_size"]),
                "model": {"decoder": {"hidden_size": dec["hidden_size"], "num_layers": dec["num_hidden_layers"],
                                      "num_heads": dec["num_attention_heads"], "head_dim": dec["head_size"],
                                      "num_kv_heads": dec["num_key_value_heads"], "vocab_size": cfg["vocab_size"],
                                      "intermediate_size": _intermediate(onnx_file)}}}

    def peak_rss(self) -> int:
        """The worker's own peak resident memory (it is another process)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:"))) * 1024
        except (OSError, StopIteration, ValueError):
            return 0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _has_nbits(path: Path) -> bool:
    import onnx

    return any(n.op_type == "MatMulNBits" for n in onnx.load(str(path), load_external_data=False).graph.node)


def _intermediate(path: Path) -> int:
    """The MLP width from the graph (genai_config does not carry it): the first down projection's K."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        if "down_proj" in node.name and node.op_type in ("MatMul", "MatMulNBits"):
            if node.op_type == "MatMulNBits":
                return next(a.i for a in node.attribute if a.name == "K")
            init = next(t for t in proto.graph.initializer if t.name == node.input[1])
            return int(init.dims[0])
    raise TgedgeError(f"{path}: no down_proj MatMul to read the MLP width from")


def describe_target(target: Target, pipe) -> dict:
    """What the floors need: the decoder's weight bytes and KV bytes per position, the model config."""
    from tgedge.floors import graph_weight_bytes, kv_bytes_per_position

    if hasattr(pipe, "bench_run"):  # a peer (onnxruntime-genai, transformers) describes itself
        return pipe.describe()
    manifest = getattr(pipe, "manifest", None)
    if manifest is not None:
        cache = manifest.contract.cache
        return {"precision": manifest.graphs["decoder"].precision, "cache": cache.mode, "model": manifest.model,
                "weight_bytes": graph_weight_bytes(manifest.graph_path("decoder")),
                "kv_per_position": kv_bytes_per_position(cache.num_layers, cache.num_kv_heads, cache.head_dim,
                                                         cache.dtype)}
    cfg = pipe.model.cfg.to_dict()
    dec = cfg["decoder"]
    params = list(pipe.model.language_model.parameters()) + (
        list(pipe.model.lm_head.parameters()) if getattr(pipe.model, "lm_head", None) is not None else [])
    return {"precision": "fp32", "cache": "preallocated (torch)", "model": cfg,
            "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "kv_per_position": kv_bytes_per_position(dec["num_layers"], dec["num_kv_heads"], dec["head_dim"])}


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


# -- the bench ----------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    runs: int = 5
    warmup: int = 1
    new_tokens: int = 16
    prompt_tokens: tuple[int, ...] = ()  # text-only contexts, besides the image question (if any)
    image: object = None
    prompt: str | None = None
    power: bool = False


def _check(settings: Settings, pipe, target: Target) -> None:
    context = getattr(pipe, "context", None)
    if settings.runs < 1 or settings.warmup < 0 or settings.new_tokens < 2:
        raise TgedgeError("need --runs >= 1, --warmup >= 0 and --new-tokens >= 2")
    needs = [(f"--prompt-tokens {n}", n) for n in settings.prompt_tokens]
    if isinstance(pipe, GenaiPeer):
        if not settings.prompt_tokens:
            raise TgedgeError("--compare genai runs text-only prompts: give --prompt-tokens")
        return
    if settings.image is not None:
        needs.append(("the question", int(pipe.pre(settings.image, settings.prompt).input_ids.shape[1])))
    for what, n in needs:
        if context is not None and n + settings.new_tokens > context:
            raise TgedgeError(f"{target.name}: {what} ({n} tokens) + --new-tokens {settings.new_tokens} does not fit "
                              f"the context ({context})")


def _one(pipe, settings: Settings) -> dict:
    """One timed run of every measurement: the image question, then each text-only context."""
    if hasattr(pipe, "bench_run"):  # a peer times itself
        return pipe.bench_run(settings)
    out = {}
    if settings.image is not None:
        out["image"] = image_run(pipe, settings.image, settings.prompt, settings.new_tokens)
    for n in settings.prompt_tokens:
        out[f"context:{n}"] = context_run(pipe, n, settings.new_tokens)
    return out


def run_bench(targets: list[Target], settings: Settings, peaks=None, progress=None) -> dict:
    """Open every target, warm each up, then `runs` rounds in which each target runs once (alternating, so that
    the machine's load drifts over all of them alike); the floors measured on this machine before and after the runs,
    the higher taken (tgedge.floors)."""
    from tgedge.floors import best_of, measure_host

    if settings.power and len(targets) > 1:
        raise TgedgeError("--power measures one model at a time (the board's power is not the model's alone)")
    sampler = PowerSampler() if settings.power else None  # before any work: a missing source fails fast
    opened, results = [], {}
    try:
        for target in targets:
            before = MemorySampler.rss()
            pipe = target.open(text_only=settings.image is None)
            opened.append((target, pipe))
            _check(settings, pipe, target)
            target.info = describe_target(target, pipe)
            loaded = pipe.peak_rss() if getattr(pipe, "separate_process", False) else MemorySampler.rss() - before
            results[target.name] = {"runs": [], "rss_loaded": loaded, "peak_rss": 0}
        threads = max((t.threads for t in targets), default=0)
        first = peaks or measure_host(threads)  # with the models loaded, before their runs
        for target, pipe in opened:
            for _ in range(settings.warmup):
                _one(pipe, settings)
        start = time.perf_counter()
        if sampler:
            sampler.__enter__()
        try:
            for _ in range(settings.runs):
                for target, pipe in opened:
                    with MemorySampler() as memory:
                        results[target.name]["runs"].append(_one(pipe, settings))
                    peak = pipe.peak_rss() if getattr(pipe, "separate_process", False) else memory.peak
                    results[target.name]["peak_rss"] = max(results[target.name]["peak_rss"], peak)
                    if progress:
                        progress()
        finally:
            if sampler:
                sampler.__exit__(None, None, None)
        elapsed = time.perf_counter() - start  # the runs alone: the power samples end with them
        peaks = first if peaks else best_of(first, measure_host(threads))  # and again after them
        if sampler:
            results[targets[0].name]["power"] = _power(sampler, elapsed,
                                                       settings.runs * settings.new_tokens * (
                                                           len(settings.prompt_tokens) + (settings.image is not None)))
    finally:
        for _, pipe in opened:
            close = getattr(pipe, "close", None)
            if close:
                close()
    return summarize(targets, settings, peaks, results)


def _power(sampler: PowerSampler, elapsed: float, tokens: int) -> dict:
    if not sampler.samples:
        raise TgedgeError(f"--power: {sampler.source} gave no readings during the run")
    avg_w = statistics.fmean(sampler.samples) / 1000
    return {"source": sampler.source, "samples": len(sampler.samples), "average_w": round(avg_w, 3),
            "energy_j": round(avg_w * elapsed, 3), "energy_per_token_j": round(avg_w * elapsed / max(tokens, 1), 4)}


def _ratio(floor: float, measured: float) -> float:
    return round(floor / measured, 3) if measured > 0 else float("nan")


def _measurement(runs: list[dict], key: str, cfg: dict, info: dict, floors) -> dict:
    """Stage stats of one measurement (the image question or a context) over the runs, with floors and ratios."""
    from tgedge.floors import decoder_flops, vision_flops

    rows = [r[key] for r in runs]
    first = rows[0]
    t, n = first["prompt_tokens"], len(first["decode_token"]) + 1
    stages = {s: stats([r[s] for r in rows]) for s in ("preprocess", *ENCODE_STAGES, "prefill") if s in first}
    stages["decode_token"] = stats([x for r in rows for x in r["decode_token"]])
    token_s = stages["decode_token"]["median"]
    floor = {"prefill_s": floors.compute_s(decoder_flops(cfg["decoder"], t)),
             "decode_token_s": floors.decode_step_s(t + n // 2)}  # the mean context while decoding
    if "vision" in first:
        floor["vision_s"] = floors.compute_s(vision_flops(cfg["vision"], first["views"]))
    of_floor = {"prefill": _ratio(floor["prefill_s"], stages["prefill"]["median"]),
                "decode": _ratio(floor["decode_token_s"], token_s)}
    if "vision_s" in floor:
        of_floor["vision"] = _ratio(floor["vision_s"], stages["vision"]["median"])
    out = {"prompt_tokens": t, "new_tokens": n, "stages": {k: {m: round(v, 6) if m != "n" else v for m, v in s.items()}
                                                             for k, s in stages.items()},
           "ttft": {m: round(v, 6) if m != "n" else v for m, v in stats([r["ttft"] for r in rows]).items()},
           "decode_tokens_per_s": round(1 / token_s, 2), "floor_tokens_per_s": round(1 / floor["decode_token_s"], 2),
           "floors_s": {k: round(v, 6) for k, v in floor.items()}, "of_floor": of_floor,
           "load": [round(r["load"], 2) for r in rows]}
    if "views" in first:
        out["views"] = first["views"]
    return out


def summarize(targets: list[Target], settings: Settings, peaks, results: dict) -> dict:
    """The report: machine, settings, floors, and per target its measurements (JSON-ready)."""
    import datetime
    import platform

    from tgedge import __version__
    from tgedge.floors import Floors

    out_targets = []
    for target in targets:
        r, info = results[target.name], target.info
        floors = Floors(peaks, info["weight_bytes"], info["kv_per_position"])
        entry = {"name": target.name, "kind": target.kind, "model": target.model, "backend": target.backend,
                 "threads": target.threads or "default", "spin": target.spin,
                 "precision": info["precision"], "cache": info["cache"], "runs": len(r["runs"]),
                 "decoder_weight_bytes": info["weight_bytes"], "kv_bytes_per_position": info["kv_per_position"],
                 "memory": {"rss_loaded_mb": round(r["rss_loaded"] / 2**20, 1),
                            "peak_rss_mb": round(r["peak_rss"] / 2**20, 1)}}
        if settings.image is not None and "image" in r["runs"][0]:
            entry["image"] = _measurement(r["runs"], "image", info["model"], info, floors)
        entry["contexts"] = [_measurement(r["runs"], f"context:{n}", info["model"], info, floors)
                             for n in settings.prompt_tokens]
        if "power" in r:
            entry["power"] = r["power"]
        out_targets.append(entry)
    return {"tgedge_version": __version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "load_average_end": [round(x, 2) for x in os.getloadavg()]},
            "settings": {"runs": settings.runs, "warmup": settings.warmup, "new_tokens": settings.new_tokens,
                         "prompt_tokens": list(settings.prompt_tokens), "image": settings.image is not None,
                         "prompt": settings.prompt},
            "floors": peaks.to_dict(), "targets": out_targets}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
