"""`tgedge chat`: --independent, each line's answer equals a fresh `tgedge run` of it, the vision output cached; by
default, a conversation whose turns equal the Conversation API's (tests/test_conversation.py: equal to recompute)."""

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
    _bad(capsys, monkeypatch, "image not found", b"q\n", "demo", "--image", image.parent / "none.png", "--independent")
    out = _bad(capsys, monkeypatch, "standard input line 2: not valid UTF-8 text (byte b'\\xe9' at 3)",
               b"what color?\ncaf\xe9\n", "demo", "--image", image, "--independent", "--json", "--max-new-tokens", 2)
    assert len(out.splitlines()) == 1  # the first line's answer came before the bad line was read
    out = _bad(capsys, monkeypatch, "'/imagine x.png' is not a command; commands: /image PATH", b"q\n/imagine x.png\n",
               "demo", "--image", image, "--json", "--max-new-tokens", 2)
    assert len(out.splitlines()) == 1
    _bad(capsys, monkeypatch, "image not found", b"/image nowhere.png\n", "demo", "--image", image)
    _bad(capsys, monkeypatch, "a follow-up question may not hold <image>", b"q\nand <image>?\n", "demo",
         "--image", image, "--max-new-tokens", 2)


def test_conversation_turns_reuse_and_commands(capsys, monkeypatch, image, tmp_path):
    """Follow-ups reuse the cache, /reset starts over, /image switches (two images), each line equal to the API's."""
    from tgedge.conversation import Conversation
    from tgedge.pipelines import open_pipeline

    second = tiny.test_image(tmp_path / "b.png", size=(60, 44), seed=3)
    lines = [QUESTIONS[0], QUESTIONS[1], "/reset", QUESTIONS[2], f"/image {image} '{second}'", QUESTIONS[0],
             QUESTIONS[1]]
    code, out, err = chat(capsys, monkeypatch, ("\n".join(lines) + "\n").encode(), "demo", "--image", image,
                          "--guide", "first", "--json", "--max-new-tokens", 5)
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [a["reused_tokens"] > 0 for a in got] == [False, True, False, False, True]
    pipe = open_pipeline("demo", None)
    options = pipe.options(max_new_tokens=5)
    expected = []
    for images, questions in [([image], QUESTIONS[:2]), ([image], QUESTIONS[2:3]), ([image, second], QUESTIONS[:2])]:
        conv = Conversation(pipe, images, "first")
        expected += [conv.ask(q, options).to_dict() for q in questions]
        conv.close()
    for a, e in zip(got, expected, strict=True):
        assert (a["tokens"], a["prompt_tokens"], a["reused_tokens"]) == (e["tokens"], e["prompt_tokens"],
                                                                          e["reused_tokens"])
    assert got[3]["prompt_tokens"] > got[2]["prompt_tokens"]  # the second image's tokens
