import json

from tgedge.checkpoint import load_model
from tgedge.cli import main
from tgedge.demo import shapes_image
from tgedge.train_demo import random_tg_checkpoint


def test_demo_checkpoint_builds_and_runs(tmp_path, capsys):
    ckpt = random_tg_checkpoint(tmp_path / "ckpt")
    model, loaded = load_model(ckpt)
    assert loaded.config.layout == "tgedge" and model.cfg.has_tg
    assert loaded.preprocessor.spec.template.name == "llava"  # no chat template: LLaVA's default prompt
    image = shapes_image(tmp_path / "img.png")
    assert main(["run", str(ckpt), "--image", str(image), "--prompt", "what color is the circle?", "--json",
                 "--max-new-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] > loaded.preprocessor.spec.num_image_tokens


def test_eval_cli_on_a_checkpoint(tmp_path, capsys):
    ckpt = random_tg_checkpoint(tmp_path / "ckpt")
    assert main(["data", "shapes", "-n", "5", "-o", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "d"), "--json", "--max-new-tokens", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 5 and len(report["per_type"]) == 5
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "d"), "--limit", "2", "--max-new-tokens", "2"]) == 0
    assert "accuracy" in capsys.readouterr().out
