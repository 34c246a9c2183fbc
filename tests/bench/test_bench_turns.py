"""tgedge bench --turns: every kind of conversation turn timed, the follow-up under guide latest giving the
recompute's tokens, the reuse counts the conversation reports; bad arguments are one line and exit 2. Counts, keys
and tokens are checked, never timings."""

import json

import pytest

from tgedge.bench.turns import CASES
from tgedge.cli import main


@pytest.mark.parametrize("model", ["demo", "export"])
def test_turns_report(model, demo_export, capsys, tmp_path):
    model = "demo" if model == "demo" else str(demo_export.directory)
    report = tmp_path / "turns.json"
    assert main(["bench", model, "--turns", "--runs", "2", "--warmup", "0", "--new-tokens", "4",
                 "--json", str(report)]) == 0
    out = capsys.readouterr().out
    r = json.loads(report.read_text())
    assert (r["runs"], r["new_tokens"], r["backend"]) == (2, 4, "torch" if model == "demo" else "onnxruntime")
    assert list(r["cases"]) == list(CASES)
    for c in r["cases"].values():
        assert c["ttft_ms"]["n"] == 2 and c["ttft_ms"]["p90"] >= c["ttft_ms"]["median"] > 0
    latest, first = r["cases"]["followup_latest"], r["cases"]["followup_first"]
    assert latest["tokens_equal_recompute"]  # the same conversation, the same guide: the recompute's tokens
    prompt = r["cases"]["recompute"]["prompt_tokens"]
    assert 0 < latest["reused_tokens"] < first["reused_tokens"] < prompt  # latest: up to the first image position
    assert set(r["cases"]["same_image"]["vs"]) == {"new_image"} and set(first["vs"]) == {"recompute"}
    assert "followup_latest" in out and f"reused {latest['reused_tokens']}/{prompt} positions" in out


@pytest.mark.parametrize("args, message", [
    (["--turns", "--batch", "2"], "--batch and --turns are two different benches: give one"),
    (["--turns", "--compare", "torch"], "--turns times conversation turns of one model: it takes no --compare"),
    (["--turns", "--prompt-tokens", "8"], "takes no --prompt-tokens"),
    (["--turns", "--image", "x.png"], "--prompt is needed with --image"),
])
def test_bad_turns_arguments_are_one_line(args, message, capsys):
    assert main(["bench", "demo", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert main(["bench", "demo", "demo", "--turns"]) == 2
    assert "--turns measures one model (got 2" in capsys.readouterr().err
