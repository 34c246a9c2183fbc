"""tgedge bench: medians over runs with a fixed token count; --power reads tegrastats (a stand-in prints recorded lines)."""

import json
import os
import stat
from pathlib import Path

from tgedge.cli import main

DATA = Path(__file__).parent / "data" / "jetson"


def test_bench_json(demo_export, capsys):
    assert main(["bench", str(demo_export.directory), "--runs", "3", "--warmup", "1", "--new-tokens", "5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "onnxruntime" and r["runs"] == 3 and r["new_tokens"] == 5
    assert len(r["all_s"]["total_s"]) == 3 and r["median_s"]["decode_s"] > 0 and "power" not in r


def test_power_from_tegrastats(demo_export, tmp_path, monkeypatch, capsys):
    fake = tmp_path / "bin" / "tegrastats"
    fake.parent.mkdir()
    lines = (DATA / "orin_nano.tegrastats").read_text().strip().splitlines()
    fake.write_text("#!/bin/sh\nwhile true; do\n" + "".join(f"echo '{ln}'\nsleep 0.05\n" for ln in lines) + "done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert main(["bench", str(demo_export.directory), "--runs", "5", "--warmup", "0", "--new-tokens", "4",
                 "--power", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)["power"]
    assert p["source"] == "tegrastats" and p["samples"] >= 1
    assert 4.285 <= p["average_w"] <= 9.876 and p["energy_per_token_j"] > 0


def test_power_without_a_source_is_a_clear_error(demo_export, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("tgedge.bench.INA_ROOT", tmp_path / "none")
    assert main(["bench", str(demo_export.directory), "--runs", "1", "--power"]) == 2
    assert "no power source" in capsys.readouterr().err
