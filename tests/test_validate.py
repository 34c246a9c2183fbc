"""`tgedge validate`: passes an honest fp32 export, names the stage of a planted defect, reports as data."""

import json
import math
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from tgedge.cli import main
from tgedge.defects import DEFECTS, plant
from tgedge.errors import TgedgeError
from tgedge.validate import STAGES, load_policy, validate

DEFECT_SAMPLES = 8


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
        assert {"max_abs", "mean_abs", "max_rel", "min_cosine", "max_rel_l2", "noise", "noise_ratio"} <= set(figs)
        assert 0 < figs["noise"] < 1e-5 and figs["noise_ratio"] < 8  # the demo: below the 1e-6 floor
        assert report["stages"][stage]["margins"]["max_noise_ratio"] > 1
    dec = report["stages"]["decoder"]["figures"]
    assert dec["top1"] == 1.0 and dec["max_abs"] <= 1e-4 and dec["kl_max"] < 1e-6
    assert report["stages"]["answers"]["figures"]["exact_match"] == 1.0
    assert report["stages"]["accuracy"]["figures"]["drop_points"] == 0
    suites = ET.parse(tmp_path / "r.xml").getroot()
    cases = suites.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == list(STAGES) and not suites.findall(".//failure")
    assert "| decoder | fp32 |" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("defect", ["vision-transpose", "decoder-mlp"])
def test_planted_defect_is_named(defect, demo_export, demo_eval, tmp_path, capsys):
    graph = DEFECTS[defect]
    broken = tmp_path / defect
    plant(demo_export.directory, broken, defect)
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
    broken = tmp_path / "broken"
    plant(demo_export.directory, broken, "vision-transpose")
    policy = tmp_path / "loose.toml"
    # as loose as limits go (each below its ceiling, tgedge.validate.RANGES)
    policy.write_text("[fp32.vision]\nmax_noise_ratio = 999999.0\nmin_cosine = 0.5\n")
    report = validate(broken, demo_eval, policy=policy, limit=3, show_progress=False)
    vision = next(s for s in report.stages if s.name == "vision")
    assert vision.passed and vision.limits == {"max_noise_ratio": 999999.0, "min_cosine": 0.5}
    assert vision.figures["noise_ratio"] > 1e4  # judged, within the loose limit
    assert load_policy()["fp32"]["vision"] == {"max_noise_ratio": 8.0, "min_cosine": 0.99999}  # defaults untouched
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


def test_report_files_never_replace_an_input(demo_export, demo_eval, tmp_path, capsys):
    """A report path is checked against every input before any work (issue 25: --json E/manifest.json replaced the
    export's manifest)."""
    export = demo_export.directory
    manifest = (export / "manifest.json").read_bytes()
    samples = (demo_eval / "samples.jsonl").read_bytes()
    cases = [
        (["validate", export, "--data", demo_eval, "--json", export / "manifest.json"], "--json", "an input"),
        (["validate", export, "--data", demo_eval, "--junit", demo_eval / "samples.jsonl"], "--junit", "an input"),
        (["validate", export, "--data", demo_eval, "--markdown", export / "new.md"], "--markdown", "inside an input"),
        (["validate", export, "--data", demo_eval, "--json", tmp_path / "r", "--junit", tmp_path / "r"], "--json",
         "and --junit both name"),
        (["validate", export, "--data", demo_eval, "--json", tmp_path], "--json", "is a directory"),
        (["bench", export, "--json", export / "decoder.onnx"], "--json", "an input"),
    ]
    for argv, flag, words in cases:
        with pytest.raises(SystemExit) as e:
            raise SystemExit(main([str(a) for a in argv]))
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert flag in err and words in err and err.count("\n") == 1, err
    assert (export / "manifest.json").read_bytes() == manifest and not (export / "new.md").exists()
    assert (demo_eval / "samples.jsonl").read_bytes() == samples


def test_policy_ranges_are_documented():
    """docs/CI.md's table of accepted limits is tgedge.validate.RANGES, key for key."""
    from tgedge.validate import LIMITS, RANGES

    text = (Path(__file__).parents[1] / "docs" / "CI.md").read_text()
    assert set(RANGES) == set(LIMITS)
    for key, accepted in RANGES.items():
        assert f"| `{key}` | {accepted} |" in text, key


@pytest.mark.parametrize("key, good, bad", [
    ("max_abs", 65504, 65505), ("max_rel", 0.999, 1.0), ("max_rel_l2", 0.0, 1.0), ("max_noise_ratio", 999999, 1e6),
    ("min_cosine", 1e-9, 0.0), ("min_top1", 1.0, 1.01), ("min_exact_match", 0.5, -0.5), ("max_drop", 99.9, 100),
    ("max_kl", math.log(49) - 1e-9, math.log(49))])
def test_policy_limit_ends(key, good, bad):
    """Each range's end: the last limit that can still fail is taken, the first one that cannot is refused."""
    from tgedge.validate import RANGES, limit_problem

    assert limit_problem(key, good, vocab_size=49) is None
    problem = limit_problem(key, bad, vocab_size=49)
    assert problem is not None and ("[0, 3.892)" if key == "max_kl" else RANGES[key]) in problem, problem
