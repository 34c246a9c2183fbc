"""The demo task data: deterministic files, balanced types, answers consistent with the drawn shapes."""

import hashlib
import json

import pytest

from tgedge.cli import main
from tgedge.data import shapes
from tgedge.data.folder import read_folder
from tgedge.errors import TgedgeError
from tgedge.evaluate import evaluate


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_byte_identical_files(tmp_path):
    for name in ("a", "b"):
        assert main(["data", "shapes", "--split", "calibration", "-n", "12", "-o", str(tmp_path / name)]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert main(["data", "shapes", "--split", "calibration", "--seed", "9", "-n", "12", "-o", str(tmp_path / "c")]) == 0
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert not list(tmp_path.glob(".*"))  # temporary folders renamed away


def test_answers_follow_the_labels():
    for s in shapes.generate(seed=3, count=100):
        kinds = [x.kind for x in s.shapes]
        assert 1 <= len(s.shapes) <= 5
        if s.type == "count":
            k = s.prompt.split()[2][:-1]
            assert s.answer == shapes.NUMBERS[kinds.count(k)]
        if s.type == "small_color":
            assert any(x.small and x.color == s.answer for x in s.shapes)
        if s.type == "presence":
            c, k = s.prompt[len("is there a "):-1].split()
            assert (s.answer == "yes") == any(x.color == c and x.kind == k for x in s.shapes)
        assert set(s.prompt.rstrip("?").split()) <= set(shapes.vocabulary())


def test_types_are_balanced():
    types = [s.type for s in shapes.generate(seed=2, count=50)]
    assert {t: types.count(t) for t in shapes.QUESTION_TYPES} == dict.fromkeys(shapes.QUESTION_TYPES, 10)


def test_evaluate_exact_match_and_chance(tmp_path):
    main(["data", "shapes", "-n", "25", "-o", str(tmp_path / "d")])
    records = read_folder(tmp_path / "d")
    truth = {r.image: r.answer for r in records}
    perfect = evaluate(lambda image, prompt: truth[image].upper() + ".", records)
    assert perfect.accuracy == 1.0 and perfect.failures == []
    wrong = evaluate(lambda image, prompt: "banana", records)
    assert wrong.accuracy == 0.0 and len(wrong.failures) == 20
    assert 0 < wrong.chance < 1 and set(wrong.per_type) == set(shapes.QUESTION_TYPES)


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_eval_bad_data(tmp_path, capsys):
    _one_line_error(capsys, ["eval", str(tmp_path), "--data", str(tmp_path / "none")], "data folder not found")
    d = tmp_path / "d"
    main(["data", "shapes", "-n", "3", "-o", str(d)])
    capsys.readouterr()
    lines = (d / "samples.jsonl").read_text().splitlines()
    (d / "samples.jsonl").write_text("\n".join([lines[0], "{not json", lines[2]]) + "\n")
    _one_line_error(capsys, ["eval", str(tmp_path), "--data", str(d)], "samples.jsonl:2: malformed JSON")
    (d / "samples.jsonl").write_text("\n".join([lines[0], json.dumps({"image": "images/gone.png", "prompt": "x"})]))
    _one_line_error(capsys, ["eval", str(tmp_path), "--data", str(d)], "samples.jsonl:2: images/gone.png: image not found")


def test_data_bad_count(tmp_path, capsys):
    _one_line_error(capsys, ["data", "shapes", "-n", "0", "-o", str(tmp_path / "x")],
                    "argument -n/--count: must be in [1, 1000000], got 0")
    with pytest.raises(TgedgeError, match="no samples.jsonl"):
        read_folder(tmp_path)
