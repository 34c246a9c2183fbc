"""tgedge device: Jetson parsers on samples in the real formats, and a clean report on this GPU-less machine."""

import json

import pytest

from tgedge.cli import main
from tiny import JETSON
from tgedge.device import jetson_module, parse_model, parse_nvpmodel, parse_tegra_release, parse_tegrastats

DATA = JETSON


@pytest.mark.parametrize("board, model, module, memory", [
    ("orin_nano", "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "Orin Nano 8GB", 7.4),
    ("orin_nx", "NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "Orin NX 16GB", 15.0),
    ("agx_orin", "NVIDIA Jetson AGX Orin Developer Kit", "AGX Orin 64GB", 61.4),
])
def test_model_and_module(board, model, module, memory):
    text = (DATA / f"{board}.model").read_text()
    assert text.endswith("\x00") and parse_model(text) == model
    assert jetson_module(model, memory) == module


@pytest.mark.parametrize("board, l4t, jetpack", [("orin_nano", "36.4.3", "6.2"), ("agx_orin", "36.3.0", "6.0"),
                                                 ("orin_nx", "35.4.1", "5.1.2")])
def test_tegra_release(board, l4t, jetpack):
    r = parse_tegra_release((DATA / f"{board}.nv_tegra_release").read_text())
    assert r["l4t"] == l4t and r["jetpack"] == jetpack


@pytest.mark.parametrize("board, mode, mode_id", [("orin_nano", "15W", 0), ("agx_orin", "MAXN", 0), ("orin_nx", "25W", 3)])
def test_nvpmodel(board, mode, mode_id):
    assert parse_nvpmodel((DATA / f"{board}.nvpmodel").read_text()) == {"power_mode": mode, "mode_id": mode_id}


@pytest.mark.parametrize("board, total_mw, ram", [("orin_nano", 9876, 3120), ("agx_orin", 3224, 5502),
                                                  ("orin_nx", 12450, 4211)])
def test_tegrastats(board, total_mw, ram):
    last = parse_tegrastats((DATA / f"{board}.tegrastats").read_text().strip().splitlines()[-1])
    assert last["total_mw"] == total_mw and last["ram_used_mb"] == ram
    assert len(last["rails_mw"]) >= 3 and "gpu_load_pct" in last


def test_device_reports_no_gpu_cleanly(capsys):
    assert main(["device", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["onnxruntime"]["version"]
    if not report["gpus"]:
        assert any("no GPU" in n for n in report["notes"])
        assert report["can_run"]["tensorrt"].startswith("no")
    assert main(["device"]) == 0
    assert "can run" in capsys.readouterr().out
