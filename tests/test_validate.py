"""`tgedge validate`: passes an honest fp32 export, names the stage of a planted defect, reports as data."""

import json
import shutil
from xml.etree import ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tgedge.cli import main
from tgedge.errors import TgedgeError
from tgedge.fileio import sha256_files
from tgedge.runtime.manifest import graph_fingerprint
from tgedge.validate import STAGES, load_policy, validate

DEFECT_SAMPLES = 8


def plant_defect(export_dir, graph, tmp_path):
    """A copy of the export with one weight tensor of `graph` scaled by 1.05 (a 5% error in one layer)."""
    out = tmp_path / f"defect-{graph}"
    shutil.copytree(export_dir, out)
    path = out / f"{graph}.onnx"
    proto = onnx.load(str(path))
    weights = sorted((t for t in proto.graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT
                      and min(t.dims) > 8), key=lambda t: t.name)
    target = weights[len(weights) // 2]
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(1.05), target.name))
    onnx.save(proto, str(path))
    # a faulty export, not a tampered one: its manifest describes the bytes it has (the gate is tests/test_gate.py)
    raw = json.loads((out / "manifest.json").read_text())
    raw["graphs"][graph].update(sha256=sha256_files([path]), fingerprint=graph_fingerprint([path]))
    (out / "manifest.json").write_text(json.dumps(raw))
    return out


def test_fp32_export_passes_with_per_stage_figures(demo_export, demo_eval, tmp_path, capsys):
    args = ["validate", str(demo_export.directory), "--data", str(demo_eval), "--limit", "20",
            "--json", str(tmp_path / "r.json"), "--junit", str(tmp_path / "r.xml"), "--markdown", str(tmp_path / "r.md")]
    assert main(args) == 0
    assert "PASS" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["first_failure"] is None and report["samples"] == 20
    assert list(report["stages"]) == list(STAGES)
    for stage in ("text_guide", "vision", "fusion", "decoder"):
        figs = report["stages"][stage]["figures"]
        assert {"max_abs", "mean_abs", "max_rel", "min_cosine"} <= set(figs)
    dec = report["stages"]["decoder"]["figures"]
    assert dec["top1"] == 1.0 and dec["max_abs"] <= 1e-4 and dec["kl_max"] < 1e-6
    assert report["stages"]["answers"]["figures"]["exact_match"] == 1.0
    assert report["stages"]["accuracy"]["figures"]["drop_points"] == 0
    suites = ET.parse(tmp_path / "r.xml").getroot()
    cases = suites.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == list(STAGES) and not suites.findall(".//failure")
    assert "| decoder | fp32 |" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("graph", ["vision", "decoder"])
def test_planted_defect_is_named(graph, demo_export, demo_eval, tmp_path, capsys):
    broken = plant_defect(demo_export.directory, graph, tmp_path)
    code = main(["validate", str(broken), "--data", str(demo_eval), "--limit", str(DEFECT_SAMPLES),
                 "--junit", str(tmp_path / "r.xml"), "--json", str(tmp_path / "r.json")])
    assert code == 1
    assert f"first stage out of budget: {graph}" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["first_failure"] == graph
    upstream = STAGES[:STAGES.index(graph)]
    assert all(report["stages"][s]["passed"] for s in upstream)  # stages are judged on the reference's inputs
    failed = [c.get("name") for c in ET.parse(tmp_path / "r.xml").getroot().iter("testcase") if c.find("failure") is not None]
    assert failed[0] == graph


def test_policy_overrides_and_errors(demo_export, demo_eval, tmp_path):
    broken = plant_defect(demo_export.directory, "vision", tmp_path)
    policy = tmp_path / "loose.toml"
    policy.write_text("[fp32.vision]\nmax_rel = 100.0\nmin_cosine = 0.0\n")
    report = validate(broken, demo_eval, policy=policy, limit=3, show_progress=False)
    vision = next(s for s in report.stages if s.name == "vision")
    assert vision.passed and vision.limits == {"max_rel": 100.0, "min_cosine": 0.0}
    assert load_policy()["fp32"]["vision"] == {"max_rel": 1e-4, "min_cosine": 0.99999}  # defaults untouched
    for text, match in (("[fp32.vison]\nmax_abs = 1\n", r"unknown stage \[fp32.vison\]"),
                        ("[fp8.vision]\nmax_abs = 1\n", r"unknown precision section \[fp8\]"),
                        ("[fp32.vision]\nmax_abss = 1\n", "unknown limit"), ("[fp32\n", "not valid TOML")):
        policy.write_text(text)
        with pytest.raises(TgedgeError, match=match):
            load_policy(policy)


def test_bad_input_exits_2(demo_export, demo_eval, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "samples.jsonl").write_text("")
    assert main(["validate", str(demo_export.directory), "--data", str(tmp_path / "empty")]) == 2
    assert "no samples" in capsys.readouterr().err
    assert main(["validate", str(tmp_path), "--data", str(demo_eval)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
