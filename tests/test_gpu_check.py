"""scripts/gpu_check: the plan fits the device time, a dummy wheel staged in pieces comes back byte for byte, a carried
folder is verified on receipt, and the run's install phase reassembles, checks and installs what was staged.

The whole `--run --device cpu` rehearsal (tiny presets, exports, bench with the torch and transformers peers) takes
minutes on a 2-core machine: it is a script-only rehearsal (docs/BENCHMARKS.md, "GPU: scripts/gpu_check"), not run
here."""

import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check"
TOOL = ROOT.parent / "shared" / "tools" / "device-wheels"
needs_tool = pytest.mark.skipif(not TOOL.exists(), reason=f"no device-wheels tool at {TOOL} (the workplace's shared "
                                                         "tools; --stage splits wheels with it)")


def gpu_check(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def dummy_wheel(folder: Path, payload: int = 3 << 20) -> Path:
    """A pure-Python wheel (any Python installs it) holding `payload` incompressible bytes."""
    import os

    path = folder / "gpucheck_dummy-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("gpucheck_dummy/__init__.py", "VALUE = 7\n")
        z.writestr("gpucheck_dummy/blob.bin", os.urandom(payload))
        z.writestr("gpucheck_dummy-0.0.1.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: gpucheck-dummy\nVersion: 0.0.1\n")
        z.writestr("gpucheck_dummy-0.0.1.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("gpucheck_dummy-0.0.1.dist-info/RECORD", "")
    return path


def plan_total(stdout: str) -> int:
    last = stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"total (\d+) s", last)
    assert match, last
    return int(match.group(1))


def test_plan_lists_every_call_within_720_s(tmp_path):
    done = gpu_check("--plan", "--stage-dir", tmp_path / "not-staged")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    calls = [line for line in lines if line.startswith("call ")]
    assert len(calls) == 6  # five 48 MiB pieces of the 255 MB wheel and the rest, the source with the last
    assert "machine start" in calls[0]
    assert all("carry [" in c and "est " in c for c in calls)
    runs = [line for line in lines if line.strip().startswith("runs: ")]
    assert len(runs) == 6 and all("--receive" in r for r in runs)
    assert "--run --device cuda --out $OUT" in runs[-1] and "--run" not in runs[0]
    assert "--run phases" in done.stdout and "tg-qwen2-1.5b" in done.stdout
    assert plan_total(done.stdout) <= 720


@needs_tool
def test_stage_pieces_reassemble_to_the_wheel(tmp_path):
    wheel = dummy_wheel(tmp_path)
    stage = tmp_path / "stage"
    done = gpu_check("--stage", "--wheel", wheel, "--stage-dir", stage)
    assert done.returncode == 0, done.stderr
    info = json.loads((stage / "stage.json").read_text())
    assert [w["name"] for w in info["wheels"]] == [wheel.name]
    assert info["wheels"][0]["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    parts = sorted(stage.glob("part*"))
    assert parts and (parts[-1] / "names.txt").read_text().split() == [wheel.name]
    joined = b"".join(p.read_bytes() for part in parts for p in sorted(part.glob("piece.*")))
    assert hashlib.sha256(joined[:wheel.stat().st_size]).hexdigest() == info["wheels"][0]["sha256"]
    for part in parts:  # each piece's own checksum, checked on receipt
        for line in (part / "SHA256SUMS").read_text().splitlines():
            digest, name = line.split()
            assert hashlib.sha256((part / name).read_bytes()).hexdigest() == digest
    assert (stage / "source" / "tgedge-src.tar.gz").stat().st_size > 0
    # the plan now carries the staged folders; the source rides with the last part
    assert plan_total(done.stdout) <= 720
    assert f"{stage}/source" in [line for line in done.stdout.splitlines() if line.startswith("call ")][-1]
    assert not list(tmp_path.glob(".gpu_check.*"))  # nothing half-written left beside it

    # --stage again replaces its own stage; a folder it did not write is refused
    assert gpu_check("--stage", "--wheel", wheel, "--stage-dir", stage).returncode == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    refused = gpu_check("--stage", "--wheel", wheel, "--stage-dir", foreign)
    assert refused.returncode == 2 and "not written by gpu_check --stage" in refused.stderr
    assert (foreign / "keep.txt").read_text() == "mine"


def test_stage_refuses_a_file_that_is_no_wheel(tmp_path):
    bad = tmp_path / "x.txt"
    bad.write_text("no")
    done = gpu_check("--stage", "--wheel", bad, "--stage-dir", tmp_path / "stage", "--tool", sys.executable)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "not a .whl file" in done.stderr
    assert not (tmp_path / "stage").exists()


def test_stage_without_the_tool_is_one_line(tmp_path):
    done = gpu_check("--stage", "--stage-dir", tmp_path / "stage", "--tool", tmp_path / "absent")
    assert done.returncode == 2 and "no device-wheels tool there" in done.stderr


@needs_tool
def test_receive_and_install_what_was_staged(tmp_path):
    """On the device: each carried folder received and verified, then the run's install phase joins the pieces,
    checks the wheel's sha256 and installs it and the staged tgedge source (here into tmp folders)."""
    wheel = dummy_wheel(tmp_path)
    stage, work = tmp_path / "stage", tmp_path / "work"
    assert gpu_check("--stage", "--wheel", wheel, "--stage-dir", stage).returncode == 0
    for folder in [*sorted(stage.glob("part*")), stage / "source"]:
        done = gpu_check("--receive", folder, "--work", work)
        assert done.returncode == 0 and "verified" in done.stdout, done.stderr
    out = tmp_path / "out"
    phase = install_phase(out, work)
    assert phase["status"] == "done", phase
    assert phase["wheels"][0]["installed"] and phase["wheels"][0]["sha256"] == hashlib.sha256(
        wheel.read_bytes()).hexdigest()
    assert (work / "site" / "gpucheck_dummy" / "__init__.py").read_text() == "VALUE = 7\n"
    assert phase["tgedge"]["from"] == str(work / "site-tgedge" / "tgedge")  # the staged source, not the checkout
    assert json.loads((out / "results.json").read_text())["phases"]["install"]["status"] == "done"


def install_phase(out: Path, work: Path) -> dict:
    """The run's install phase alone, in its own process (it puts what it installs first on sys.path)."""
    install = ("import sys, json; sys.path.insert(0, sys.argv[1]); from gpu_check_run import Run; "
               "from pathlib import Path; r = Run('cpu', Path(sys.argv[2]), Path(sys.argv[3]), None); "
               "r.phase('install', r.install); print(json.dumps(r.results['phases']['install']))")
    done = subprocess.run([sys.executable, "-c", install, str(ROOT / "scripts"), str(out), str(work)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_tool
def test_install_names_the_missing_pieces(tmp_path):
    """A part not received (the machine went back between calls): the install phase says which, and installs
    nothing."""
    wheel = dummy_wheel(tmp_path)
    stage, work = tmp_path / "stage", tmp_path / "work"
    assert gpu_check("--stage", "--wheel", wheel, "--stage-dir", stage).returncode == 0
    assert gpu_check("--receive", stage / "part00", "--work", work).returncode == 0
    (work / "part00").rename(work / "part01")  # as if part00 of two had not come
    phase = install_phase(tmp_path / "out", work)
    assert phase["status"].startswith("failed") and "wheel pieces missing: part00" in phase["status"]
    assert not (work / "site").exists()


@needs_tool
def test_receive_refuses_a_broken_piece(tmp_path):
    wheel = dummy_wheel(tmp_path)
    stage, work = tmp_path / "stage", tmp_path / "work"
    assert gpu_check("--stage", "--wheel", wheel, "--stage-dir", stage).returncode == 0
    piece = next(stage.glob("part00/piece.*"))
    data = bytearray(piece.read_bytes())
    data[100] ^= 0xFF
    piece.write_bytes(bytes(data))
    done = gpu_check("--receive", stage / "part00", "--work", work)
    assert done.returncode == 2 and "differs from its sha256" in done.stderr
    assert not (work / "part00").exists()


def test_run_refuses_an_out_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    done = gpu_check("--run", "--device", "cpu", "--out", tmp_path, "--work", tmp_path / "work")
    assert done.returncode == 2 and "did not write" in done.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "work").exists()


def run_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check_run

    return gpu_check_run


def test_bench_modes_put_torch_and_transformers_on_cuda():
    """On CUDA: CUDA graphs first (alone), then without graphs beside torch eager and transformers generate on CUDA;
    on the CPU one call, the peers on the CPU; without transformers installed, torch alone and a note."""
    twin = Path("/w/presets/llava-qwen2-1.5b")
    modes, notes = run_module().bench_modes("cuda", twin, True)
    (graphs_label, graphs), (plain_label, plain) = modes
    assert "--cuda-graph" in graphs and "--compare" not in graphs and "--torch-device" not in graphs
    assert plain[plain.index("--compare") + 1] == "torch,transformers"
    assert plain[plain.index("--torch-device") + 1] == "cuda" and str(twin) in plain and "--cuda-graph" not in plain
    assert "on CUDA" in notes["peers"] and "transformers" not in notes
    (_, cpu), = run_module().bench_modes("cpu", twin, True)[0]
    assert "--torch-device" not in cpu and cpu[cpu.index("--compare") + 1] == "torch,transformers"
    modes, notes = run_module().bench_modes("cuda", twin, False)
    assert modes[1][1][modes[1][1].index("--compare") + 1] == "torch" and str(twin) not in modes[1][1]
    assert "not installed" in notes["transformers"]


def test_tools_run_together_and_name_the_failure(tmp_path):
    """Phase.tools: the commands at once; the first that fails named, with its last line."""
    m = run_module()
    run = m.Run("cpu", tmp_path / "out", tmp_path / "work", None)
    phase = m.Phase(run, "presets", 120)
    with pytest.raises(RuntimeError, match=r"^second: exit 2: .*invalid choice"):
        phase.tools([(("--help",), "first"), (("no-such-command",), "second")])
    log = (tmp_path / "out" / "run.log").read_text()
    assert "(first:" in log and "(second:" in log
