"""The gate cannot be fooled, and names read from an export directory stay inside it: a swapped or relabelled graph,
manifest names escaping the folder, NaN policy limits, absurd calibration ranges, bytes that are no engine."""

import json
import shutil

import pytest

from tgedge.cli import main
from tgedge.fileio import MARKER


@pytest.fixture(scope="module")
def int4(demo_quantized):
    return demo_quantized("int4w").directory  # the session's, read-only: the tests copy it


def copy_export(src, dst):
    shutil.copytree(src, dst)
    (dst / MARKER).unlink()
    return dst


def edit_manifest(d, change):
    raw = json.loads((d / "manifest.json").read_text())
    change(raw)
    (d / "manifest.json").write_text(json.dumps(raw))


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from tgedge.demo import shapes_image

    return shapes_image(tmp_path_factory.mktemp("img") / "shapes.png")


def test_a_swapped_graph_is_refused_by_run_and_validate(demo_export, int4, demo_eval, image, tmp_path, capsys):
    d = copy_export(demo_export.directory, tmp_path / "swapped")
    shutil.copyfile(int4 / "decoder.onnx", d / "decoder.onnx")  # same inputs/outputs, another graph
    code, err = cli(capsys, "run", d, "--image", image, "--prompt", "what color is the circle?")
    assert code == 2 and "graph 'decoder' (decoder.onnx) is not the one manifest.json describes (fingerprint" in err
    assert len(err.splitlines()) == 1
    code, err = cli(capsys, "validate", d, "--data", demo_eval, "--limit", 1)
    assert code == 2 and "(sha256 differs)" in err
    code, _ = cli(capsys, "run", d, "--image", image, "--prompt", "what color is the circle?", "--no-verify")
    assert code == 0


def test_a_relabelled_graph_is_refused_by_validate(int4, demo_eval, tmp_path, capsys):
    d = copy_export(int4, tmp_path / "relabelled")  # hashes right, label wrong: the fp32 policy would judge it

    def relabel(raw):
        raw["graphs"]["decoder"]["precision"] = "fp32"
    edit_manifest(d, relabel)
    code, err = cli(capsys, "validate", d, "--data", demo_eval, "--limit", 1)
    assert code == 2 and "precision labels do not match the graphs (decoder says fp32, its graph is int4w)" in err


@pytest.mark.parametrize("key, name, fragment", [
    ("graph", "../vision.onnx", "resolves to"),
    ("graph", "/etc/passwd", "is an absolute path"),
    ("file", "../../x.json", "resolves to"),
])
def test_manifest_names_stay_inside_the_export(demo_export, tmp_path, capsys, image, key, name, fragment):
    d = copy_export(demo_export.directory, tmp_path / "escape")

    def change(raw):
        if key == "graph":
            raw["graphs"]["vision"]["file"] = name
        else:
            raw["files"]["preprocess"] = name
    edit_manifest(d, change)
    code, err = cli(capsys, "run", d, "--image", image, "--prompt", "what color?")
    assert code == 2 and fragment in err and "manifest.json" in err


def test_quantize_copies_nothing_from_outside(demo_export, tmp_path, capsys):
    d = copy_export(demo_export.directory, tmp_path / "escape")
    (tmp_path / "secret.json").write_text("{}")
    edit_manifest(d, lambda raw: raw["files"].update(preprocess="../secret.json"))
    code, err = cli(capsys, "quantize", d, "-o", tmp_path / "q", "--precision", "fp16")
    assert code == 2 and "outside" in err and not (tmp_path / "q").exists()


def test_nan_policy_limits_are_refused(demo_export, demo_eval, tmp_path, capsys):
    policy = tmp_path / "nan.toml"
    policy.write_text("[fp32.decoder]\nmax_abs = nan\n")
    code, err = cli(capsys, "validate", demo_export.directory, "--data", demo_eval, "--policy", policy)
    assert code == 2 and "limits must be finite numbers" in err and "fp32.decoder.max_abs nan" in err


def test_absurd_calibration_ranges_are_refused(demo_export, tmp_path, capsys):
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"method": "minmax", "graphs": {g: {"x": {"lowest": -1e30, "highest": 1e30}}
                                                              for g in ("text_guide", "vision", "fusion", "decoder")}}))
    code, err = cli(capsys, "quantize", demo_export.directory, "-o", tmp_path / "q", "--precision", "int8",
                    "--calibration", cal)
    assert code == 2 and "not finite or beyond 1e6" in err and not (tmp_path / "q").exists()


def _calibration(change=lambda c: None):
    tensor = {"CLS": "TensorData", "lowest": {"CLS": "numpy.array", "data": [-1.0], "dtype": "float32"}, "highest": 1.0}
    method = {"CLS": "CalibrationMethod", "value": "CalibrationMethod.MinMax"}
    c = {"method": "minmax", "data": {"path": "cal", "samples": 2, "sha256": "ab"},
         "graphs": {g: {"CLS": "TensorsData", "calibration_method": method, "data": {"x": json.loads(json.dumps(tensor))},
                        "smooth_quant": False} for g in ("text_guide", "vision", "fusion", "decoder")}}
    change(c)
    return c


def test_a_well_formed_calibration_file_passes():
    from tgedge.calibration.saved import calibration_problems

    assert calibration_problems(_calibration()) == []


@pytest.mark.parametrize("change, fragment", [
    (lambda c: c["graphs"]["vision"]["data"]["x"].update(lowest=2.0),
     'calibration.json: graphs.vision.data["x"]: lowest 2.0 is above highest 1.0'),
    (lambda c: c["graphs"]["vision"]["data"]["x"]["lowest"].update(dtype="float8"),
     'graphs.vision.data["x"].lowest dtype \'float8\' is not one of float32, float16'),
    (lambda c: c["graphs"]["vision"]["data"]["x"].update(highest="high"),
     'graphs.vision.data["x"].highest must be a number or a numpy.array object'),
    (lambda c: c["graphs"]["vision"]["data"]["x"].update(mean=0.0), 'graphs.vision.data["x"]: unknown key(s) mean'),
    (lambda c: c["graphs"]["fusion"]["data"]["x"].pop("highest"), 'graphs.fusion.data["x"].highest missing'),
    (lambda c: c.update(methd="minmax"), "calibration.json: unknown key(s) methd (known: method, data, graphs"),
    (lambda c: c.update(method="minmaxx"), 'method must be one of minmax, entropy, percentile (got "minmaxx")'),
    (lambda c: c["data"].update(samples="2"), "data must be an object with path (string), samples (integer)"),
    (lambda c: c["graphs"]["decoder"].update(smooth_quant="no"), 'graphs.decoder.smooth_quant must be true or false'),
    (lambda c: c["graphs"]["decoder"].update(calibration_method="MinMaxx"), "graphs.decoder.calibration_method must"),
    (lambda c: c.update(smooth=True), "smooth must be a number in [0, 1]"),
    (lambda c: c.update(channels={"decoder": {"x": ["a"]}}), 'channels.decoder["x"] must be a list of finite numbers'),
])
def test_malformed_calibration_files_are_refused(demo_export, tmp_path, capsys, change, fragment):
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps(_calibration(change)))
    code, err = cli(capsys, "quantize", demo_export.directory, "-o", tmp_path / "q", "--precision", "int8",
                    "--calibration", cal)
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "q").exists()


def test_random_bytes_named_engine(tmp_path, capsys):
    (tmp_path / "x.engine").write_bytes(bytes(range(256)) * 8)
    code, err = cli(capsys, "inspect", tmp_path / "x.engine")
    assert code == 2 and "not a TensorRT engine (starts with" in err


def test_export_refuses_to_write_over_its_input(tmp_path, capsys):
    from tgedge.train_demo import random_tg_checkpoint

    ckpt = random_tg_checkpoint(tmp_path / "ckpt")
    before = sorted(p.name for p in ckpt.iterdir())
    code, err = cli(capsys, "export", ckpt, "-o", ckpt, "--force")
    assert code == 2 and "is the input" in err and sorted(p.name for p in ckpt.iterdir()) == before
