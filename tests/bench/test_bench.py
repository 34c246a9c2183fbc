"""tgedge bench: per-stage medians and p90 with floors, models side by side, JSON / Markdown / PNG reports; --power
reads tegrastats (a stand-in prints recorded lines); bad arguments are one line and exit 2."""

import json
import os
import stat

import pytest

from tgedge.cli import main
from tiny import JETSON

DATA = JETSON
STAGES = {"preprocess", "text_guide", "vision", "fusion", "embed", "prefill", "decode_token"}


def test_bench_json(demo_export, capsys):
    assert main(["bench", str(demo_export.directory), "--runs", "3", "--warmup", "1", "--new-tokens", "5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["settings"]["runs"] == 3 and r["settings"]["new_tokens"] == 5 and r["floors"]["bandwidth_gb_s"] > 0
    (t,) = r["targets"]
    assert t["backend"] == "onnxruntime" and t["runs"] == 3 and t["cache"] == "growing" and "power" not in t
    image = t["image"]
    assert set(image["stages"]) == STAGES and image["new_tokens"] == 5
    assert image["stages"]["decode_token"]["n"] == 3 * 4 and image["stages"]["vision"]["n"] == 3
    assert all(s["p90"] >= s["median"] > 0 for s in image["stages"].values())
    assert image["decode_tokens_per_s"] > 0 and image["ttft"]["median"] > image["stages"]["prefill"]["median"]
    assert set(image["of_floor"]) == {"vision", "prefill", "decode"} and len(image["load"]) == 3
    assert t["memory"]["peak_rss_mb"] > 0 and t["decoder_weight_bytes"] > 0


def test_reports_side_by_side(demo_export, demo_static_exports, tmp_path, capsys, peaks_measured_once):
    """Two models alternating, the image question and text-only contexts: well-formed JSON, Markdown, PNG."""
    static = demo_static_exports("static").directory
    out = {k: tmp_path / f"r.{k}" for k in ("json", "md", "png")}
    assert main(["bench", str(demo_export.directory), str(static), "--runs", "2", "--warmup", "0", "--new-tokens", "4",
                 "--prompt-tokens", "16,40", "--json", str(out["json"]), "--markdown", str(out["md"]),
                 "--plot", str(out["png"])]) == 0
    text = capsys.readouterr().out
    assert "GB/s" in text and "static cache" in text
    r = json.loads(out["json"].read_text())
    assert [t["cache"] for t in r["targets"]] == ["growing", "static"]
    for t in r["targets"]:
        assert set(t["image"]["stages"]) == STAGES and [c["prompt_tokens"] for c in t["contexts"]] == [16, 40]
        assert all(c["decode_tokens_per_s"] > 0 and c["floor_tokens_per_s"] > 0 for c in t["contexts"])
        assert all("vision" not in c["stages"] for c in t["contexts"])
    md = out["md"].read_text().splitlines()
    tables = [ln for ln in md if ln.startswith("|")]
    assert len(tables) == 2 + 2 + 2 + 4 + 2 + 2  # header + rule + rows, three tables
    for block in (tables[:4], tables[4:10], tables[10:]):
        assert len({ln.count("|") for ln in block}) == 1  # every row as wide as its header
    png = out["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(out["png"])).shape[0] > 100


def test_text_only_loads_the_decoder_alone(demo_export, capsys, tmp_path, peaks_measured_once):
    png = tmp_path / "chart.png"
    assert main(["bench", str(demo_export.directory), "--no-image", "--prompt-tokens", "8", "--runs", "1",
                 "--warmup", "0", "--new-tokens", "3", "--json", "--plot", str(png)]) == 0
    (t,) = json.loads(capsys.readouterr().out)["targets"]
    assert "image" not in t and set(t["contexts"][0]["stages"]) == {"embed", "prefill", "decode_token"}
    import matplotlib.image

    height, width = matplotlib.image.imread(str(png)).shape[:2]
    assert height > 100 and width < 1.6 * height  # the context chart alone, no empty stage panel beside it


@pytest.mark.parametrize("args, message", [
    (["--prompt-tokens", "0"], "must be >= 1"),
    (["--prompt-tokens", "12,x"], "comma-separated list"),
    (["--compare", "genai", "--prompt-tokens", "8"], "--compare genai needs --genai-model"),
    (["--plot", "chart.jpg"], "must end in .png"),
    (["--json", "/no/such/dir/r.json"], "no such directory"),
    (["--no-image"], "--no-image needs --prompt-tokens"),
    (["--new-tokens", "300"], "does not fit the context"),
    (["--runs", "0"], "--runs"),
    (["--cuda-graph"], "--cuda-graph needs --backend onnxruntime-cuda"),
])
def test_bad_arguments_are_one_line(demo_export, args, message, capsys):
    assert main(["bench", str(demo_export.directory), "--warmup", "0", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_power_from_tegrastats(demo_export, tmp_path, monkeypatch, capsys, peaks_measured_once):
    fake = tmp_path / "bin" / "tegrastats"
    fake.parent.mkdir()
    lines = (DATA / "orin_nano.tegrastats").read_text().strip().splitlines()
    fake.write_text("#!/bin/sh\nwhile true; do\n" + "".join(f"echo '{ln}'\nsleep 0.05\n" for ln in lines) + "done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert main(["bench", str(demo_export.directory), "--runs", "5", "--warmup", "0", "--new-tokens", "4",
                 "--power", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)["targets"][0]["power"]
    assert p["source"] == "tegrastats" and p["samples"] >= 1
    assert 4.285 <= p["average_w"] <= 9.876 and p["energy_per_token_j"] > 0


def test_power_without_a_source_is_a_clear_error(demo_export, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("tgedge.bench.samplers.INA_ROOT", tmp_path / "none")
    assert main(["bench", str(demo_export.directory), "--runs", "1", "--power"]) == 2
    assert "no power source" in capsys.readouterr().err


def test_power_measures_one_model(demo_export, capsys):
    assert main(["bench", str(demo_export.directory), str(demo_export.directory), "--runs", "1", "--power"]) == 2
    assert "one model at a time" in capsys.readouterr().err


def test_genai_peer_through_its_worker_protocol(demo_export, tmp_path, capsys, peaks_measured_once):
    """--compare genai with a stand-in worker (onnxruntime-genai is not installed here): the peer's text-only
    timings come back as a target of their own, with its floors from its graph and genai_config.json."""
    import sys

    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    model = tmp_path / "genai"
    model.mkdir()
    w = numpy_helper.from_array(np.zeros((8, 4), np.float32), "down.weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "down.weight"], ["y"], name="/l.0/mlp/down_proj/MatMul")],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    (model / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    (model / "genai_config.json").write_text(json.dumps({"model": {"vocab_size": 50, "decoder": {
        "filename": "model.onnx", "head_size": 8, "hidden_size": 4, "num_attention_heads": 2, "num_hidden_layers": 1,
        "num_key_value_heads": 1}}}))
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps({{'ready': 'stand-in'}}), flush=True)\n"
                    "for line in sys.stdin:\n    r = json.loads(line)\n"
                    "    print(json.dumps({'prompt_tokens': r['prompt_tokens'], 'prefill': 0.01, 'ttft': 0.01, "
                    "'load': 1.0, 'decode_token': [0.002] * (r['new_tokens'] - 1)}), flush=True)\n")
    fake.chmod(0o755)
    assert main(["bench", str(demo_export.directory), "--no-image", "--prompt-tokens", "8", "--runs", "2",
                 "--warmup", "0", "--new-tokens", "3", "--compare", "genai", "--genai-model", str(model),
                 "--genai-python", str(fake), "--json"]) == 0
    ours, peer = json.loads(capsys.readouterr().out)["targets"]
    assert peer["kind"] == "genai" and peer["contexts"][0]["decode_tokens_per_s"] == 500.0
    assert peer["decoder_weight_bytes"] == 128 and peer["kv_bytes_per_position"] == 2 * 1 * 1 * 8 * 4
    assert ours["contexts"][0]["prompt_tokens"] == peer["contexts"][0]["prompt_tokens"] == 8
