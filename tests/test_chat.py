"""`tgedge chat --independent`: each line's answer equals a fresh `tgedge run` of it, the vision output cached."""

import io
import json
import sys

import pytest

import tiny
from tgedge.cli import main

QUESTIONS = ["what color is the circle?", "how many shapes are there?", "is there a red square?"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from tgedge.demo import shapes_image

    return shapes_image(tmp_path_factory.mktemp("img") / "shapes.png")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny.hf_llava(d)
    return d


def chat(capsys, monkeypatch, stdin: bytes, *argv):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(["chat", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


def fresh_run(capsys, model, image, question, n):
    assert main(["run", str(model), "--image", str(image), "--prompt", question, "--json",
                 "--max-new-tokens", str(n)]) == 0
    return json.loads(capsys.readouterr().out)


def assert_like_fresh_runs(capsys, monkeypatch, model, image, n=6):
    stdin = ("\n".join(QUESTIONS) + "\n\n").encode()  # a blank line is skipped
    code, out, err = chat(capsys, monkeypatch, stdin, model, "--image", image, "--independent", "--json",
                          "--max-new-tokens", n)
    assert code == 0, err
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["vision_cached"] for a in answers] == [False, True, True]
    for question, a in zip(QUESTIONS, answers, strict=True):
        expected = fresh_run(capsys, model, image, question, n)
        assert (a["tokens"], a["text"], a["prompt_tokens"]) == (expected["tokens"], expected["text"],
                                                                expected["prompt_tokens"]), question
        assert set(a["timings"]) >= {"prefill_s", "decode_s"}


def test_demo_answers_equal_fresh_runs(capsys, monkeypatch, image):
    assert_like_fresh_runs(capsys, monkeypatch, "demo", image)


def test_tiny_llava_answers_equal_fresh_runs(capsys, monkeypatch, image, tiny_llama):
    assert_like_fresh_runs(capsys, monkeypatch, tiny_llama, image, 8)


def test_demo_export_answers_equal_fresh_runs(capsys, monkeypatch, image, demo_export):
    assert_like_fresh_runs(capsys, monkeypatch, demo_export.directory, image)


def test_text_output_and_the_cache_off(capsys, monkeypatch, image):
    stdin = "\n".join(QUESTIONS[:2]).encode()  # no newline at the end: the last line is still a question
    code, out, _ = chat(capsys, monkeypatch, stdin, "demo", "--image", image, "--independent", "--max-new-tokens", 4)
    assert code == 0 and len(out.splitlines()) == 2
    code, out, _ = chat(capsys, monkeypatch, stdin, "demo", "--image", image, "--independent", "--json",
                        "--vision-cache-mb", 0, "--max-new-tokens", 4)
    assert code == 0 and [json.loads(line)["vision_cached"] for line in out.splitlines()] == [False, False]


def _bad(capsys, monkeypatch, match, stdin, *argv):
    code, out, err = chat(capsys, monkeypatch, stdin, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tgedge: error:"), err
    assert match in lines[0], lines[0]
    return out


def test_refusals(capsys, monkeypatch, image):
    _bad(capsys, monkeypatch, "chat without --independent (follow-up turns reusing the KV cache) is not "
         "implemented yet", b"q\n", "demo", "--image", image)
    _bad(capsys, monkeypatch, "chat takes one image for now (tgedge run takes several)", b"q\n", "demo",
         "--image", image, "--image", image, "--independent")
    _bad(capsys, monkeypatch, "image not found", b"q\n", "demo", "--image", image.parent / "none.png", "--independent")
    out = _bad(capsys, monkeypatch, "standard input line 2: not valid UTF-8 text (byte b'\\xe9' at 3)",
               b"what color?\ncaf\xe9\n", "demo", "--image", image, "--independent", "--json", "--max-new-tokens", 2)
    assert len(out.splitlines()) == 1  # the first line's answer came before the bad line was read
