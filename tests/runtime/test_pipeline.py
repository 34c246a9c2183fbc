"""The torch-free Pipeline against the PyTorch reference: same answers, same logits, clear errors."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tgedge.cli import main
from tgedge.data.folder import read_folder
from tgedge.errors import TgedgeError
from tgedge.export.onnx_export import export_model
from tgedge.reference import TorchPipeline
from tgedge.runtime.manifest import Manifest
from tgedge.runtime.pipeline import Pipeline


def answer_and_prefill_logits(pipe, image, prompt, max_new_tokens):
    """`pipe.answer` end to end (preprocessing, every stage, the decode loop), and the last prompt-token logits of the
    prefill it ran: the answer's own, so that each sample's stages run once, not again for the logits."""
    seen, prefill = [], pipe.prefill

    def recording(x):
        out = prefill(x)
        seen.append(np.array(out))
        return out
    pipe.prefill = recording  # the instance's attribute: generate calls pipe.prefill
    try:
        answer = pipe.answer(image, prompt, pipe.options(max_new_tokens=max_new_tokens))
    finally:
        del pipe.prefill
    (logits,) = seen
    return answer, logits


def assert_runtime_matches_reference(export_dir, checkpoint, samples, max_new_tokens=8):
    """Greedy tokens identical and last prompt-token logits within 1e-4 on every sample."""
    ref = TorchPipeline.from_checkpoint(checkpoint)
    worst = 0.0
    with Pipeline(export_dir) as rt:
        for image, prompt in samples:
            a, ref_logits = answer_and_prefill_logits(ref, image, prompt, max_new_tokens)
            b, rt_logits = answer_and_prefill_logits(rt, image, prompt, max_new_tokens)  # the runtime's own stages
            worst = max(worst, float(np.abs(rt_logits - ref_logits).max()))
            assert a.tokens == b.tokens, (prompt, a.text, b.text)
    assert worst <= 1e-4, worst
    return worst


def test_demo_export_answers_like_the_reference(demo_export, demo_eval):
    records = read_folder(demo_eval)
    assert len(records) >= 50
    assert_runtime_matches_reference(demo_export.directory, "demo", [(r.image, r.prompt) for r in records])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_llava_exports_answer_like_the_reference(family, tmp_path):
    from tiny import hf_llava, test_image

    hf_llava(tmp_path / "ckpt", family)
    export_model(tmp_path / "ckpt", tmp_path / "out")
    images = [test_image(tmp_path / f"{i}.png", size=(40 + 9 * i, 30 + 5 * i), seed=i) for i in range(3)]
    prompts = ["what color is the circle?", "how many are there?", "describe the image in a picture"]
    assert_runtime_matches_reference(tmp_path / "out", tmp_path / "ckpt", list(zip(images, prompts)), 16)


def test_tg_qwen2_original_layout_export(tmp_path):
    """TG modules on a Qwen2 decoder (tied embeddings, qkv bias), from the original repository layout."""
    from tiny import clip_dir, original_tg_checkpoint, test_image

    clip = clip_dir(tmp_path / "clip")
    ckpt = original_tg_checkpoint(tmp_path / "ckpt", clip, "qwen2")
    result = export_model(ckpt, tmp_path / "out", clip=clip)
    assert result.passed and set(result.manifest.graphs) == {"text_guide", "vision", "fusion", "embed", "decoder"}
    image = test_image(tmp_path / "i.png")
    ref = TorchPipeline.from_checkpoint(ckpt, clip)
    with Pipeline(tmp_path / "out") as rt:
        a = ref.answer(image, "what color is the square?", ref.options(max_new_tokens=12))
        b = rt.answer(image, "what color is the square?", rt.options(max_new_tokens=12))
    assert a.tokens == b.tokens


def test_run_cli_on_export_dir(demo_export, demo_eval, capsys):
    first = read_folder(demo_eval)[0]
    argv = ["--image", str(first.image), "--prompt", first.prompt, "--json"]
    assert main(["run", str(demo_export.directory), *argv]) == 0
    rt = json.loads(capsys.readouterr().out)
    assert main(["run", "demo", "--backend", "torch", *argv]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == rt["tokens"]


NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
from tgedge.cli import main
code = main(sys.argv[1:])
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
sys.exit(code)
"""


def test_runtime_runs_where_torch_cannot_load(demo_export, demo_eval):
    first = read_folder(demo_eval)[0]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "run", str(demo_export.directory), "--image",
                           str(first.image), "--prompt", first.prompt, "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"]
    code = "import sys, tgedge.runtime, tgedge.runtime.pipeline, tgedge.runtime.onnxrt; " \
           "sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- bad export directories -------------------------------------------------------------------------------------
@pytest.fixture
def broken(demo_export, tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(demo_export.directory, out)
    return out


def _manifest(d, edit):
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_missing_graph(broken):
    (broken / "vision.onnx").unlink()
    with pytest.raises(TgedgeError, match=r"graph 'vision' is missing \(vision.onnx not found\)"):
        Pipeline(broken)


def test_manifest_from_another_version(broken):
    _manifest(broken, lambda m: m.update(tgedge_version="0.0.9"))
    with pytest.raises(TgedgeError, match="written by tgedge 0.0.9 .* export the model again"):
        Pipeline(broken)


def test_graph_io_not_matching_manifest(broken):
    _manifest(broken, lambda m: m["graphs"]["fusion"]["inputs"][0].update(name="features"))
    with pytest.raises(TgedgeError, match="fusion.onnx: graph inputs do not match manifest.json"):
        Pipeline(broken)


def test_not_an_export_dir(tmp_path, capsys):
    assert main(["run", str(tmp_path), "--backend", "onnxruntime", "--image", "x.png", "--prompt", "q"]) == 2
    assert "is not one" in capsys.readouterr().err


def test_context_cap(demo_export):
    with Pipeline(demo_export.directory) as rt:
        with pytest.raises(TgedgeError, match="exceed the export's max context"):
            rt.setup_cache(rt.manifest.max_context + 1)


def test_max_context_above_the_export_is_refused(demo_export, demo_eval, capsys):
    """Not clamped silently: one line naming both numbers."""
    first = read_folder(demo_eval)[0]
    longest = Manifest.load(demo_export.directory).max_context
    argv = ["run", str(demo_export.directory), "--image", str(first.image), "--prompt", first.prompt]
    assert main([*argv, "--max-context", str(longest + 1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--max-context {longest + 1} is above the export's max_context {longest}" in err
    assert main([*argv, "--max-context", str(longest), "--max-new-tokens", "2"]) == 0


def _raw_manifest(d, old, new):
    text = (d / "manifest.json").read_text()
    assert old in text
    (d / "manifest.json").write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(graphs=[]), "manifest.json: graphs must be an object (got [])"),
    (lambda m: m.update(max_context=True), "max_context must be an integer in [1, 2147483647] (got true)"),
    (lambda m: m.update(max_context="2048"), 'max_context must be an integer in [1, 2147483647] (got "2048")'),
    (lambda m: m.update(max_context=2 ** 40), "max_context must be an integer in [1, 2147483647] (got 1099511627776)"),
    (lambda m: m.update(opset=17.0), "opset must be an integer in [1, 1000] (got 17.0)"),
    (lambda m: m["dims"]["sequence_length"].update(max="many"), "dims.sequence_length must be"),
    (lambda m: m["dims"]["sequence_length"].update(min=9, opt=3), "dims.sequence_length must have min <= opt <= max"),
    (lambda m: m["graphs"].update(vision="vision.onnx"), 'graphs.vision must be an object (got "vision.onnx")'),
    (lambda m: m["graphs"]["vision"].update(precision="fp8"), "graphs.vision.precision 'fp8' is not one of"),
    (lambda m: m["graphs"]["vision"]["inputs"][0].update(shape=["batch", 1.5]), "graphs.vision.inputs[0].shape must be"),
    (lambda m: m.update(dims=None, files=[]), "dims must be an object (got null); files must be an object (got [])"),
])
def test_manifest_fields_are_checked_at_load(broken, edit, message):
    _manifest(broken, edit)
    with pytest.raises(TgedgeError, match=re.escape(message)):
        Manifest.load(broken)


def test_manifest_numbers_json_cannot_hold(broken, demo_eval, capsys):
    """1e400 reads as inf: refused at load, one line, by every command that reads a manifest."""
    _raw_manifest(broken, '"max_context": ', '"max_context": 1e400, "was": ')
    for argv in (["inspect", broken], ["quantize", broken, "--precision", "fp16", "-o", broken.parent / "q"],
                 ["triton", broken, "-o", broken.parent / "repo"], ["validate", broken, "--data", demo_eval],
                 ["run", broken, "--image", read_folder(demo_eval)[0].image, "--prompt", "q"]):
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "manifest.json: max_context must be an integer in [1, 2147483647] (got inf)" \
            in err, (argv, err)


@pytest.mark.parametrize("key", ["sha256", "fingerprint"])
def test_a_graph_without_a_checksum_is_not_passed_unchecked(broken, key):
    _manifest(broken, lambda m: m["graphs"]["vision"].update({key: None}))
    verify = "sha256" if key == "sha256" else "fingerprint"
    with pytest.raises(TgedgeError, match=f"graph 'vision' \\(vision.onnx\\) has no {key} in manifest.json, so it "
                                          "cannot be checked: export again, or pass --no-verify"):
        Pipeline(broken, verify=verify)
    Pipeline(broken, verify=None).close()  # --no-verify: on purpose
