"""tgedge bench --compare transformers: LlavaForConditionalGeneration.generate on the same plain-LLaVA weights as
tgedge's reference (its tensors, shared), timed inside generate; TG-LLaVA checkpoints need a plain twin."""

import json

import numpy as np
import pytest
import torch

import tiny
from tgedge.bench.peers import TransformersPeer
from tgedge.cli import main
from tgedge.errors import TgedgeError
from tgedge.reference import TorchPipeline

QUESTION = "what color is the circle?"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava-qwen2")
    tiny.hf_llava(d, "qwen2")
    return d


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory):
    """The llava-tiny preset: the original LLaVA layout (no image token in its vocabulary), its CLIP in DIR/clip."""
    d = tmp_path_factory.mktemp("llava-tiny") / "ckpt"
    assert main(["checkpoint", "random", "--preset", "llava-tiny", "-o", str(d), "--dtype", "fp32"]) == 0
    return d


def test_generate_gives_the_reference_tokens(hf_dir):
    """The twin holds the reference's tensors: greedy tokens equal, with the image and text-only."""
    peer = TransformersPeer(str(hf_dir), None)
    ref = TorchPipeline.from_checkpoint(hf_dir)
    image = tiny.test_image(hf_dir / "image.png")
    options = ref.options(max_new_tokens=8, eos_token_ids=[], stop_strings=[])
    ours = ref.answer(image, QUESTION, options).tokens
    inputs = peer.pre(image, QUESTION)
    run = peer.generate(peer.ids_with_image(inputs), inputs.pixel_values, 8)
    assert run["tokens"] == ours and len(set(ours)) > 1
    assert len(run["stamps"]) == 8 and run["vision"] > 0 and run["fusion"] > 0
    lm = peer.model.model.language_model
    assert lm.embed_tokens.weight.data_ptr() == peer.model.lm_head.weight.data_ptr()  # tied, as Qwen2 ties them

    from tgedge.bench.genai_worker import ids_for
    from tgedge.generate import GenerationOptions, generate

    ids = ids_for(12, peer.cfg.decoder.vocab_size)[None]
    x = ref.embed_tokens(ids)
    expected = generate(ref, x, GenerationOptions(max_new_tokens=6, eos_token_ids=[]), 1000).tokens
    assert peer.generate(ids, None, 6)["tokens"] == expected


def test_timings_from_the_stamps():
    """TTFT from the run's start, prefill less the vision tower and projector, each decode step between two logits."""
    run = {"started": 10.0, "stamps": [12.0, 12.5, 13.25], "vision": 0.5, "fusion": 0.25}
    out = TransformersPeer._timings(run, 9.0, 1.5, prompt_tokens=7)
    assert out["ttft"] == 3.0 and out["prefill"] == 1.25 and out["decode_token"] == [0.5, 0.75]
    assert (out["vision"], out["fusion"], out["load"], out["prompt_tokens"]) == (0.5, 0.25, 1.5, 7)
    text = TransformersPeer._timings({"started": 1.0, "stamps": [1.5, 1.75]}, 1.0, 0.0)
    assert text["prefill"] == text["ttft"] == 0.5 and "vision" not in text


def test_original_layout_gets_an_image_token(original_dir):
    """No image token in the vocabulary: the image positions take an id the prompt lacks; logits equal the
    reference's."""
    peer = TransformersPeer(str(original_dir), str(original_dir / "clip"))
    assert peer.cfg.image_token_index is None
    ref = TorchPipeline.from_checkpoint(original_dir, original_dir / "clip")
    image = tiny.test_image(original_dir.parent / "image.png")
    inputs = peer.pre(image, QUESTION)
    ids = peer.ids_with_image(inputs)
    image_positions = inputs.input_ids == peer.pre.spec.image_token_id
    chosen = int(ids[image_positions][0])
    assert (ids[image_positions] == chosen).all() and chosen not in ids[~image_positions]
    with torch.no_grad():
        theirs = peer.model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(inputs.pixel_values)).logits
    ours = ref.prefill(ref.embeddings(ref.pre(image, QUESTION)))
    assert np.std(ours) > 0
    np.testing.assert_allclose(theirs[0, -1].numpy(), ours, rtol=0, atol=1e-4 * np.abs(ours).max())


def test_bench_reports_the_peer(hf_dir, tmp_path, capsys, peaks_measured_once):
    """A plain-LLaVA export with --compare transformers: the peer's stages inside generate, and its own cache."""
    from tgedge.export.onnx_export import export_model

    export = export_model(str(hf_dir), tmp_path / "export", check=False).directory
    assert main(["bench", str(export), "--compare", "transformers", "--prompt-tokens", "8", "--runs", "2",
                 "--warmup", "0", "--new-tokens", "3", "--json"]) == 0
    ours, peer = json.loads(capsys.readouterr().out)["targets"]
    assert peer["kind"] == "transformers" and peer["cache"].startswith("dynamic (transformers")
    assert set(peer["image"]["stages"]) == {"preprocess", "vision", "fusion", "prefill", "decode_token"}
    assert peer["image"]["stages"]["decode_token"]["n"] == 2 * 2 and peer["image"]["views"] == 1
    assert peer["image"]["prompt_tokens"] == ours["image"]["prompt_tokens"]
    assert all(s["median"] > 0 for s in peer["image"]["stages"].values())
    assert peer["image"]["ttft"]["median"] > peer["image"]["stages"]["prefill"]["median"]
    assert peer["contexts"][0]["prompt_tokens"] == 8 and peer["contexts"][0]["decode_tokens_per_s"] > 0
    assert peer["decoder_weight_bytes"] > 0 and peer["kv_bytes_per_position"] == ours["kv_bytes_per_position"]


def test_a_twin_for_a_tg_export(demo_export, original_dir, capsys, peaks_measured_once):
    """A TG-LLaVA export runs beside a plain twin named by --transformers-model; its CLIP is found in DIR/clip."""
    assert main(["bench", str(demo_export.directory), "--no-image", "--prompt-tokens", "8", "--runs", "1",
                 "--warmup", "0", "--new-tokens", "3", "--compare", "transformers", "--transformers-model",
                 str(original_dir), "--json"]) == 0
    ours, peer = json.loads(capsys.readouterr().out)["targets"]
    assert peer["model"] == str(original_dir) and peer["contexts"][0]["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--compare", "transformers"], "transformers has no TG modules"),
    (["--transformers-model", "x"], "--transformers-model is for --compare transformers"),
])
def test_bad_arguments(demo_export, args, message, capsys):
    assert main(["bench", str(demo_export.directory), "--runs", "1", "--warmup", "0", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_cuda_without_cuda_is_one_line(monkeypatch, tmp_path):
    """Said before the checkpoint is read (the path does not exist)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TgedgeError, match="^torch device cuda: .* sees no CUDA device"):
        TransformersPeer(str(tmp_path / "absent"), None, "cuda")


def test_on_the_cpu_in_fp32(hf_dir):
    peer = TransformersPeer(str(hf_dir), None, "cpu")
    info = peer.describe()
    assert info["precision"] == "fp32" and info["cache"].endswith(", cpu)")
    assert {p.device.type for p in peer.model.parameters()} == {"cpu"}
