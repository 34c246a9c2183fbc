"""`scripts/gpu_check --run`: the measurement, phase by phase, each within its own time budget.

Every phase writes what it measured into `results.json` as soon as it has it (and `results.md` / `results.png` are
rendered from it at each phase's end), so a phase stopped at its budget, or a call killed at its limit, still brings
back everything measured before. Long steps (writing presets, exporting, each bench) run as `python -m tgedge`
subprocesses with the phase's remaining seconds as their timeout; in-process loops check the clock between items.

Nothing here imports tgedge or onnxruntime before the install phase has put the staged wheels and source first on
`sys.path` (and on the subprocesses' PYTHONPATH).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

# Per device: phase -> seconds. cuda's are the plan's (scripts/gpu_check --plan adds them up); cpu's fit the tiny
# presets of the rehearsal. A phase past its budget stops and the run goes on to the next.
BUDGETS = {
    "cuda": {"install": 40, "floors": 15, "parity": 55, "presets": 70, "export": 110, "bench": 150, "copies": 20,
             "report": 5},
    "cpu": {"install": 30, "floors": 30, "parity": 150, "presets": 30, "export": 60, "bench": 180, "copies": 20,
            "report": 10},
}
# Where the cuda budgets come from: this CPU's rehearsal (2 shared cores, the tiny presets, 2026-12-02) and the
# figures of docs/SCALE.md; the GPU machine's own speed is an assumption until it has run.
BASIS = {
    "install": "rehearsal: 6 s to join + check the 255 MB wheel and install the source; the wheel's install (350 MB "
               "unpacked) assumed 30 s",
    "floors": "rehearsal: 11-13 s (host floors); on CUDA a 1 GiB copy and an 8192^3 GEMM take < 1 s, torch's import "
              "and CUDA start the rest",
    "parity": "rehearsal: 86 s (4 small exports at 18-21 s each: torch import and tracing on 2 loaded cores); "
              "assumed 2x faster there",
    "presets": "tg-qwen2-0.5b (2.1 GB) writes in 17-23 s here (docs/SCALE.md): 4.2 GB about 45 s; its plain twin "
               "(transformers') written at the same time by a second process",
    "export": "tg-qwen2-1.5b fp16 --no-check: 94 s here (docs/SCALE.md)",
    "bench": "rehearsal: 46-50 s per bench call with both peers; on CUDA 2 calls (with graphs; without, beside torch "
             "eager and transformers generate on CUDA, fp16), each loading the 3 GB export (and 2 x ~3.5 GB into "
             "torch), 3 contexts x 4 runs of 32 tokens; assumed ~30 s and ~80 s",
    "copies": "rehearsal: 0.1 s; on CUDA two pipeline loads, assumed 8 s each",
    "report": "rehearsal: under 3 s (matplotlib)",
}
# What the bench phase measures, per device: the preset (and its plain twin for transformers), the export's dtype,
# the prompt lengths, tokens generated and timed runs per context.
BENCH = {
    "cuda": {"preset": "tg-qwen2-1.5b", "twin": "llava-qwen2-1.5b", "dtype": "fp16", "contexts": (128, 671, 2048),
             "new_tokens": 32, "runs": 3},
    "cpu": {"preset": "tg-tiny", "twin": "llava-tiny", "dtype": "fp32", "contexts": (32, 128, 512), "new_tokens": 16,
            "runs": 2},
}
PARITY = (("demo", "demo"), ("tg-tiny", "tg-tiny"))  # name, checkpoint (`demo` or a preset written in the run)
PARITY_DTYPES = ("fp32", "fp16")
PARITY_TOKENS = 16
FILES = ("results.json", "results.md", "results.png", "run.log")  # all the run writes under --out (<= 8 come back)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class Stopped(Exception):
    """A phase ran out of its budget (what it measured so far is kept)."""


class Phase:
    def __init__(self, run: "Run", name: str, budget: float):
        self.run, self.name, self.budget = run, name, budget
        self.start = time.monotonic()
        self.entry = run.results["phases"].setdefault(name, {"budget_s": budget})

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def check(self, what: str) -> None:
        if self.remaining() <= 1:
            raise Stopped(f"{what}: stopped at the phase's budget ({self.budget} s)")

    def record(self, key: str, value) -> None:
        self.entry[key] = value
        self.run.save()

    def tool(self, *args: str, what: str) -> subprocess.CompletedProcess:
        """`python -m tgedge ARGS` within the phase's remaining time; its output goes to run.log."""
        return self.tools([(args, what)])[0]

    def tools(self, commands: list[tuple[tuple[str, ...], str]]) -> list[subprocess.CompletedProcess]:
        """`python -m tgedge ARGS` for each (ARGS, what) at the same time, all within the phase's remaining time (one
        past it: every one still running is stopped); their output goes to run.log, in order."""
        for _, what in commands:
            self.check(what)
        procs = []
        for args, what in commands:
            cmd = [sys.executable, "-m", "tgedge", *args]
            self.run.log(f"$ {' '.join(cmd)}")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=self.run.env))
        start, done, failed = time.monotonic(), [], None
        try:
            for proc, (args, what) in zip(procs, commands):
                try:
                    out, err = proc.communicate(timeout=max(self.remaining(), 1))
                except subprocess.TimeoutExpired:
                    raise Stopped(f"{what}: stopped at the phase's budget ({self.budget} s)") from None
                self.run.log(f"{out[-4000:]}{err[-4000:]}\n({what}: {time.monotonic() - start:.1f} s)")
                done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
                if proc.returncode != 0 and failed is None:
                    failed = f"{what}: exit {proc.returncode}: {(err.strip().splitlines() or [''])[-1]}"
        finally:
            for proc in procs:  # ours, stopped at the budget (or after another's failure, on an exception)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if failed:
            raise RuntimeError(failed)
        return done


def installs_here(wheel: str) -> bool:
    """Whether this Python can install the wheel (a cp312 wheel is verified but not installed on a 3.11 rehearsal)."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    return bool(set(parse_wheel_filename(wheel)[3]) & set(sys_tags()))


def pip_install(phase: Phase, *args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(phase.remaining(), 1))
    phase.run.log(f"$ {' '.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    if done.returncode != 0:
        raise RuntimeError(f"pip install: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


class Run:
    def __init__(self, device: str, out: Path, work: Path, stage: Path | None, budgets: dict | None = None):
        self.device, self.out, self.work, self.stage = device, out, work, stage
        self.budgets = budgets or BUDGETS[device]
        self.env = dict(os.environ)
        self.results = {"device": device, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "phases": {}, "no_gpu_figure": device != "cuda"}
        self.started = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self.save()

    # -- files ------------------------------------------------------------------------------------------------------
    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(self.out / "results.json")

    def log(self, text: str) -> None:
        with open(self.out / "run.log", "a") as f:
            f.write(text.rstrip() + "\n")

    def phase(self, name: str, fn) -> None:
        phase = Phase(self, name, self.budgets[name])
        self.log(f"== {name} (budget {phase.budget} s)")
        try:
            fn(phase)
            status = "done"
        except Stopped as e:
            status = f"stopped: {e}"
        except Exception as e:  # one phase's failure is a result; the next phases still run
            status = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        phase.entry.update(status=status, seconds=round(time.monotonic() - phase.start, 1))
        self.log(f"== {name}: {status} ({phase.entry['seconds']} s)")
        self.save()
        if name != "install":
            self.render(plot=name in ("bench", "report"))

    def render(self, plot: bool = True) -> None:
        """results.md (and results.png) from the results so far; a failure to render is logged, not raised."""
        from gpu_check_report import write_markdown, write_plot

        try:
            write_markdown(self.results, self.out / "results.md")
            if plot:
                write_plot(self.results, self.out / "results.png")
        except Exception as e:  # the JSON holds the figures either way
            self.log(f"render: {type(e).__name__}: {e}")

    def found(self, name: str) -> Path | None:
        """A staged folder: received on the device (WORK/name) or, rehearsing here, the stage folder's own."""
        for base in (self.work, self.stage):
            if base is not None and (base / name).is_dir():
                return base / name
        return None

    # -- phases -----------------------------------------------------------------------------------------------------
    def install(self, phase: Phase) -> None:
        parts = sorted({p.name for base in (self.work, self.stage) if base and base.is_dir()
                        for p in base.glob("part[0-9][0-9]")})
        site = self.work / "site"
        if not parts:
            phase.record("wheels", "none staged: onnxruntime as installed")
        else:
            dirs = [self.found(p) for p in parts]
            last = next((i for i, d in enumerate(dirs) if (d / "names.txt").exists()), None)
            missing = [f"part{i:02d}" for i in range(len(parts) if last is None else last + 1)
                       if f"part{i:02d}" not in parts] + ([] if last is not None else ["the last part (names.txt)"])
            if missing:
                raise RuntimeError(f"wheel pieces missing: {', '.join(missing)} (did the machine go back between "
                                   "calls? carry them again, back to back)")
            names = (dirs[-1] / "names.txt").read_text().split()
            sizes = [int(s) for s in (dirs[-1] / "sizes.txt").read_text().split()]
            expected = dict(line.split()[::-1] for line in (dirs[-1] / "wheels.sha256").read_text().splitlines())
            pieces = [p for d in dirs for p in sorted(d.glob("piece.*"))]
            wheels_dir = self.work / "wheels"
            wheels_dir.mkdir(exist_ok=True)
            with open(self.work / "all.bin", "wb") as whole:  # the device-wheels format: wheels joined, then split
                for piece in pieces:
                    with open(piece, "rb") as f:
                        shutil.copyfileobj(f, whole)
            checked = []
            with open(self.work / "all.bin", "rb") as whole:
                for name, size in zip(names, sizes):
                    target = wheels_dir / name
                    with open(target, "wb") as f:
                        f.write(whole.read(size))
                    digest = sha256(target)
                    if digest != expected.get(name):
                        raise RuntimeError(f"{name}: sha256 {digest[:16]}... is not the staged {expected.get(name)}")
                    checked.append({"name": name, "bytes": size, "sha256": digest})
            (self.work / "all.bin").unlink()
            installable = [wheels_dir / w["name"] for w in checked if installs_here(w["name"])]
            for w in checked:
                w["installed"] = wheels_dir / w["name"] in installable
            phase.record("wheels", checked)
            if installable:
                phase.check("install the wheels")
                pip_install(phase, "--upgrade", "--target", str(site), *map(str, installable))
                self._first_on_path(site)
        source = self.found("source")
        if source is None:
            phase.record("source", "none staged: tgedge as installed")
        else:
            tarball = source / "tgedge-src.tar.gz"
            digest = sha256(tarball)
            if digest != (source / "tgedge-src.tar.gz.sha256").read_text().split()[0]:
                raise RuntimeError("tgedge-src.tar.gz: sha256 differs from the staged one")
            src, tg_site = self.work / "src", self.work / "site-tgedge"
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(tg_site, ignore_errors=True)
            with tarfile.open(tarball) as tar:
                tar.extractall(src, filter="data")
            phase.check("install the tgedge source")
            pip_install(phase, "--no-build-isolation", "--target", str(tg_site), str(src))
            self._first_on_path(tg_site)
            phase.record("source", {"sha256": digest, **json.loads((source / "source.json").read_text())})
        if self.device == "cuda":
            import torch  # noqa: F401  (loads the CUDA and cuDNN libraries onnxruntime's provider links against)
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls") and self.device == "cuda":
            ort.preload_dlls()
        import tgedge

        phase.record("onnxruntime", {"version": ort.__version__, "providers": ort.get_available_providers(),
                                     "from": str(Path(ort.__file__).parent)})
        phase.record("tgedge", {"from": str(Path(tgedge.__file__).parent)})

    def _first_on_path(self, path: Path) -> None:
        sys.path.insert(0, str(path))
        self.env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [self.env.get("PYTHONPATH")])])

    @property
    def ort_device(self) -> str:
        """`cuda` where onnxruntime has its CUDA provider and the run is on the GPU (an onnxruntime-gpu build lists the
        provider on a CPU machine too)."""
        import onnxruntime as ort

        return "cuda" if self.device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"

    def floors(self, phase: Phase) -> None:
        from tgedge.floors import measure_peaks

        phase.record("peaks", measure_peaks(self.device).to_dict())

    def _export(self, phase: Phase, checkpoint: str, name: str, dtype: str, cache: str = "static") -> Path:
        out = self.work / "exports" / name
        clip = Path(checkpoint) / "clip"  # where `checkpoint random` puts an original-layout preset's CLIP
        if not (out / "manifest.json").exists():
            phase.tool("export", checkpoint, "-o", str(out), "--dtype", dtype, "--cache", cache, "--no-check",
                       *(("--clip", str(clip)) if (clip / "config.json").exists() else ()), what=f"export {name}")
        return out

    def _preset(self, phase: Phase, preset: str) -> Path:
        return self._presets(phase, [preset])[0]

    def _presets(self, phase: Phase, presets: list[str]) -> list[Path]:
        """The presets written under WORK/presets, those not there yet by one process each, at the same time."""
        outs = [self.work / "presets" / p for p in presets]
        phase.tools([(("checkpoint", "random", "--preset", p, "-o", str(out)), f"write {p}")
                     for p, out in zip(presets, outs) if not (out / "config.json").exists()])
        return outs

    def parity(self, phase: Phase) -> None:
        """Greedy tokens of onnxruntime on the device (CUDA when its provider is there) against onnxruntime CPU."""
        from tgedge.data import shapes
        from tgedge.generate import generate
        from tgedge.runtime.pipeline import Pipeline
        from tgedge.sampling import GenerationOptions

        device = self.ort_device
        sample = next(iter(shapes.generate(shapes.SPLIT_SEEDS["eval"], 1)))
        rows = []
        for name, checkpoint in PARITY:
            if checkpoint != "demo":
                checkpoint = str(self._preset(phase, checkpoint))
            for dtype in PARITY_DTYPES:
                export = self._export(phase, checkpoint, f"{name}-{dtype}", dtype)
                tokens = {}
                for backend in ("onnxruntime", "onnxruntime-cuda" if device == "cuda" else "onnxruntime"):
                    phase.check(f"greedy tokens of {name} {dtype}")
                    with Pipeline(export, backend) as pipe:
                        providers = pipe.runners["decoder"].session.get_providers()  # what it fell back to, if any
                        x = pipe.embeddings(pipe.pre(sample.image, sample.prompt))
                        tokens[backend] = generate(pipe, x, GenerationOptions(max_new_tokens=PARITY_TOKENS),
                                                   pipe.context).tokens
                cpu, dev = tokens["onnxruntime"], tokens["onnxruntime-cuda" if device == "cuda" else "onnxruntime"]
                first = next((i for i, (a, b) in enumerate(zip(cpu, dev)) if a != b), None)
                rows.append({"model": name, "dtype": dtype, "device": device, "equal": cpu == dev, "tokens": len(cpu),
                             "first_difference": first, "cpu": cpu, "device_tokens": dev,
                             "device_providers": providers})
                phase.record("rows", rows)

    def presets(self, phase: Phase) -> None:
        spec = BENCH[self.device]
        written = self._presets(phase, [spec["preset"], *([spec["twin"]] if spec["twin"] else [])])
        phase.record("written", list(map(str, written)))

    def export(self, phase: Phase) -> None:
        spec = BENCH[self.device]
        ckpt = self.work / "presets" / spec["preset"]
        out = self._export(phase, str(ckpt), f"{spec['preset']}-{spec['dtype']}", spec["dtype"])  # parity's, on cpu
        phase.record("export", str(out))

    def bench(self, phase: Phase) -> None:
        """`tgedge bench` over the contexts (text-only prompts): TTFT, decode tok/s and their floors' ratios, each
        call's report kept as it comes (`bench_modes`: which calls, beside which peers)."""
        import importlib.util

        spec = BENCH[self.device]
        export = self.work / "exports" / f"{spec['preset']}-{spec['dtype']}"
        contexts = ",".join(map(str, spec["contexts"]))
        common = ["bench", str(export), "--no-image", "--prompt-tokens", contexts, "--new-tokens",
                  str(spec["new_tokens"]), "--runs", str(spec["runs"]), "--warmup", "1"]
        twin = self.work / "presets" / spec["twin"] if spec["twin"] else None
        modes, notes = bench_modes(self.device, twin, importlib.util.find_spec("transformers") is not None)
        for key, note in notes.items():
            phase.record(key, note)
        rows = phase.entry.setdefault("rows", [])
        for i, (label, args) in enumerate(modes):
            report = self.work / f"bench-{i}.json"
            phase.tool(*common, *args, "--json", str(report), what=f"bench{label or ''}")
            data = json.loads(report.read_text())
            for target in data["targets"]:
                target["name"] += label if target["kind"] == "tgedge" else ""
                for m in target["contexts"]:
                    rows.append({"target": target["name"], "backend": target["backend"], "context": m["prompt_tokens"],
                                 "ttft_s": m["ttft"]["median"], "decode_tokens_per_s": m["decode_tokens_per_s"],
                                 "floor_tokens_per_s": m["floor_tokens_per_s"], "of_floor": m["of_floor"]})
            phase.record("rows", rows)
            phase.record("report", merge_reports(phase.entry.get("report"), data))

    def copies(self, phase: Phase) -> None:
        """Copies of the KV cache per decode step: the cache buffers' addresses across steps (bound once, written in
        place) and, on CUDA, the memory copies CUPTI sees per step (torch.profiler), those of a cache buffer's size
        or more counted as cache copies; on CUDA with and without CUDA graphs."""
        from gpu_check_copies import decode_copies

        spec = BENCH[self.device]
        export = self.work / "exports" / f"{spec['preset']}-{spec['dtype']}"
        cuda = self.ort_device == "cuda"
        for key, options in (("cache", {}), *((("cache_cuda_graph", {"cuda_graph": True}),) if cuda else ())):
            phase.check(key)
            phase.record(key, decode_copies(export, "onnxruntime-cuda" if cuda else "onnxruntime", options))

    def report(self, phase: Phase) -> None:
        phase.record("files", list(FILES))  # results.md and results.png are rendered after this phase (Run.phase)


def bench_modes(device: str, twin: Path | None, transformers: bool) -> tuple[list[tuple[str, list[str]]], dict]:
    """The bench calls as (label, arguments), and notes on what is not measured. On the CPU one call, beside the
    torch reference and transformers generate (the plain twin) on the CPU. On CUDA first with CUDA graphs (the figure
    the issue's targets are about, measured before anything riskier), then without, beside torch eager (tgedge's
    reference) and transformers generate, both on CUDA in fp16 (`--torch-device cuda`); transformers only where it is
    installed (tgedge's source is installed there without dependencies)."""
    peers = ["torch", *(["transformers"] if transformers else [])]
    compare = ["--compare", ",".join(peers), *(["--transformers-model", str(twin)] if transformers else [])]
    notes = {} if transformers else {"transformers": "transformers generate not run: transformers is not installed"}
    if device == "cpu":
        notes["cuda_graphs"] = "not measured: CUDA graphs need onnxruntime's CUDA provider"
        return [("", ["--backend", "onnxruntime", *compare])], notes
    notes["peers"] = (f"{' and '.join(peers)} on CUDA (fp16, --torch-device cuda), beside onnxruntime-cuda without "
                      "graphs")
    return [(" + CUDA graphs", ["--backend", "onnxruntime-cuda", "--cuda-graph"]),
            ("", ["--backend", "onnxruntime-cuda", *compare, "--torch-device", "cuda"])], notes


def merge_reports(merged: dict | None, report: dict) -> dict:
    """One bench report of the calls so far: their targets side by side (the floors: the first call's)."""
    if merged is None:
        return report
    by_name = {t["name"]: t for t in merged["targets"]}
    for target in report["targets"]:
        if target["name"] in by_name:
            by_name[target["name"]]["contexts"] += target["contexts"]
        else:
            merged["targets"].append(target)
    return merged


def run(device: str, out: Path, work: Path, stage: Path | None) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))  # gpu_check_report beside this file
    r = Run(device, out, work, stage)
    for name in ("install", "floors", "parity", "presets", "export", "bench", "copies", "report"):
        r.phase(name, getattr(r, name))
    r.render(plot=False)  # the report phase's own status in the table
    return r.results
