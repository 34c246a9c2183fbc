"""The embedded demo model answers the shapes task: accuracy on a fixed 300-sample subset of the eval split."""

import pytest

from tgedge import demo_checkpoint
from tgedge.cli import main
from tgedge.data import shapes
from tgedge.data.folder import read_folder, write_folder
from tgedge.evaluate import evaluate
from tgedge.reference import TorchPipeline

SUBSET = 300


@pytest.fixture(scope="module")
def eval_subset(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "eval300"
    write_folder(shapes.generate(shapes.SPLIT_SEEDS["eval"], SUBSET), out)
    return read_folder(out)


def test_demo_model_accuracy_on_fixed_subset(eval_subset):
    pipe = TorchPipeline.from_checkpoint(demo_checkpoint())
    options = pipe.options(max_new_tokens=4)
    report = evaluate(lambda image, prompt: pipe.answer(image, prompt, options).text, eval_subset)
    assert report.total == SUBSET
    assert report.accuracy >= 0.88, report.per_type
    assert report.chance < 0.6  # the task is not trivial


def test_word_demo_is_a_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder named demo here
    image = shapes.sample(__import__("numpy").random.default_rng(0)).image
    image.save(tmp_path / "x.png")
    assert main(["run", "demo", "--image", str(tmp_path / "x.png"), "--prompt", "what color is the circle?",
                 "--json"]) == 0
    assert '"text"' in capsys.readouterr().out
