"""`tgedge run`: JSON output, streaming, and one-line errors with exit code 2 for bad input."""

import json

import pytest
from safetensors.torch import load_file, save_file

import tiny
from tgedge.checkpoint import load_checkpoint
from tgedge.cli import main
from tgedge.errors import TgedgeError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    tiny.hf_llava(d)
    return d


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return tiny.test_image(tmp_path_factory.mktemp("img") / "image.png")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_json(ckpt, image, capsys):
    code, out, err = run(capsys, "run", ckpt, "--image", image, "--prompt", "what color?", "--json",
                         "--max-new-tokens", "5")
    assert code == 0
    result = json.loads(out)
    assert 1 <= len(result["tokens"]) <= 5 and result["prompt_tokens"] > 4
    assert set(result["timings"]) >= {"prefill_s", "decode_s"} and isinstance(result["text"], str)


def test_run_streams_text(ckpt, image, capsys):
    code, out, _ = run(capsys, "run", ckpt, "--image", image, "--prompt", "what color?", "--max-new-tokens", "4")
    assert code == 0 and out.endswith("\n")


def _bad(capsys, match, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tgedge: error:"), err
    assert match in lines[0], lines[0]
    return lines[0]


def test_missing_dir(tmp_path, image, capsys):
    _bad(capsys, "checkpoint directory not found", "run", tmp_path / "nope", "--image", image, "--prompt", "x")


def test_unknown_model_type(tmp_path, image, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip2"}))
    line = _bad(capsys, "unknown model_type 'blip2'", "run", tmp_path, "--image", image, "--prompt", "x")
    assert str(tmp_path) in line


def test_missing_and_misshaped_tensors_listed_together(ckpt, tmp_path, image, capsys):
    import shutil
    d = tmp_path / "broken"
    shutil.copytree(ckpt, d)
    state = load_file(str(d / "model.safetensors"))
    gone = [k for k in state if "language_model" in k and "layers.1.mlp" in k]
    for k in gone:
        del state[k]
    k = next(k for k in state if k.endswith("multi_modal_projector.linear_1.bias"))
    state[k] = state[k][:3]
    state["something.extra"] = state[k].clone()
    save_file(state, str(d / "model.safetensors"))
    line = _bad(capsys, "missing (3)", "run", d, "--image", image, "--prompt", "x")
    assert "mis-shaped (1): multi_modal_projector.linear_1.bias (3,) != (48,)" in line
    assert "unexpected (1): something.extra" in line


def test_unreadable_image(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    _bad(capsys, "unreadable image", "run", ckpt, "--image", bad, "--prompt", "x")
    _bad(capsys, "image not found", "run", ckpt, "--image", tmp_path / "none.png", "--prompt", "x")


def test_prompt_longer_than_context(ckpt, image, capsys):
    _bad(capsys, "longer than the context (8)", "run", ckpt, "--image", image, "--prompt", "what color?",
         "--max-context", "8")


def test_image_given_twice(ckpt, image, capsys):
    _bad(capsys, "one image takes one", "run", ckpt, "--image", image, "--prompt", "<image> a <image>")


def test_bin_weights_load_weights_only(ckpt, tmp_path):
    import shutil
    import torch
    d = tmp_path / "bin"
    shutil.copytree(ckpt, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    assert load_checkpoint(d).weights.keys()
    torch.save({"x": object()}, d / "pytorch_model.bin")  # a pickle with an arbitrary object is refused
    with pytest.raises(TgedgeError, match="weights_only"):
        load_checkpoint(d)


def test_debug_shows_traceback(tmp_path, image):
    with pytest.raises(TgedgeError):
        main(["--debug", "run", str(tmp_path / "nope"), "--image", str(image), "--prompt", "x"])
