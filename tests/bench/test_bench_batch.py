"""tgedge bench --batch: the decoder alone at batch B on a static-cache export; one level per batch size with its
step statistics and tokens/s over all rows, every row picking the same tokens (the same prompt in each slot); bad
arguments are one line and exit 2. Counts and keys are checked, never timings."""

import json

import pytest

from tgedge.cli import main
from tgedge.export.onnx_export import export_model


@pytest.fixture(scope="module")
def demo_static(tmp_path_factory):
    return export_model("demo", tmp_path_factory.mktemp("bench_batch") / "static", cache_mode="static",
                        check=False).directory


def test_batch_levels(demo_static, capsys, tmp_path):
    report = tmp_path / "batch.json"
    argv = ["bench", str(demo_static), "--batch", "1,3,4", "--runs", "3", "--warmup", "1", "--prompt-tokens", "12"]
    assert main([*argv, "--json", str(report)]) == 0
    out = capsys.readouterr().out
    r = json.loads(report.read_text())
    assert (r["cache"], r["prompt_tokens"], r["runs"], r["warmup"]) == ("static", 12, 3, 1)
    assert [lv["batch"] for lv in r["levels"]] == [1, 3, 4]
    for lv in r["levels"]:
        assert set(lv) == {"batch", "step_ms", "tokens_per_s", "rows_agree", "load", "vs_batch1"}
        assert lv["step_ms"]["n"] == 3 and lv["step_ms"]["p90"] >= lv["step_ms"]["median"] > 0
        assert lv["tokens_per_s"] == pytest.approx(lv["batch"] * 1e3 / lv["step_ms"]["median"], rel=1e-3)
        assert lv["rows_agree"]
    assert r["levels"][0]["vs_batch1"] == 1.0
    assert "batch    4" in out and "tok/s all rows" in out
    assert main([*argv[:3], "2", "--runs", "2", "--json"]) == 0  # alone: the JSON on stdout
    assert [lv["vs_batch1"] for lv in json.loads(capsys.readouterr().out)["levels"]] == [None]


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "every batch size must be in [1, 1024]"),
    (["--batch", "2", "--compare", "torch"], "takes no --compare"),
    (["--batch", "2", "--no-image", "--plot", "x.png"], "takes no --no-image, --plot"),
    (["--batch", "2", "--prompt-tokens", "8,16"], "one --prompt-tokens length"),
    (["--batch", "2", "--new-tokens", "8"], "takes no --new-tokens (--runs counts its steps)"),
    (["--batch", "2", "--backend", "tensorrt"], "batched TensorRT engines are not built yet"),
    (["--batch", "2", "--prompt-tokens", "100000"], "exceed the static cache"),
])
def test_bad_batch_arguments_are_one_line(demo_static, args, message, capsys):
    assert main(["bench", str(demo_static), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_batch_needs_a_static_cache_export(demo_export, capsys):
    assert main(["bench", str(demo_export.directory), "--batch", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a static KV cache; this export's is 'growing'" in err and len(err.splitlines()) == 1, err
    assert main(["bench", "demo", "--batch", "2"]) == 2  # a checkpoint: no decoder graph to batch
    assert "give one export directory" in capsys.readouterr().err
