"""The demo training code runs end to end (a few steps; the real run takes about an hour, not in CI)."""

import json

import pytest

from tgedge.checkpoint import load_model
from tgedge.train_demo import TrainSettings, train_demo


@pytest.mark.parametrize("ablate", [False, True], ids=["tg", "no-tg"])
def test_train_demo_few_steps(tmp_path, ablate):
    cfg = TrainSettings(vision_steps=3, answer_steps=3, batch=4, eval_every=3, eval_samples=5)
    out = train_demo(tmp_path / "ckpt", cfg, ablate_tg=ablate)
    model, ckpt = load_model(out)
    assert model.cfg.has_tg is not ablate
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"towers", "answers"}
    assert "held_out_first_token_acc" in log[-1]
    assert json.loads((out / "train_settings.json").read_text())["ablate_tg"] is ablate


def test_same_seed_same_weights(tmp_path):
    """Training is seeded end to end and the checkpoint file is written deterministically (the shipped run,
    re-run in full, gave the same tensors); one metadata key keeps safetensors' header order fixed."""
    cfg = TrainSettings(vision_steps=3, answer_steps=3, batch=4, eval_every=3, eval_samples=5)
    a, b = (train_demo(tmp_path / name, cfg) for name in ("a", "b"))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    other = train_demo(tmp_path / "c", TrainSettings(seed=1, vision_steps=3, answer_steps=3, batch=4,
                                                     eval_every=3, eval_samples=5))
    assert (other / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
