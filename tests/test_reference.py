"""The torch reference on a device and in a dtype: the CPU in fp32 as ever (the same tokens), any other placement
loaded straight there without an fp32 copy (here: fp16 and float64 on the CPU, the path CUDA takes), CUDA asked for
without it a one-line error before anything loads."""

import numpy as np
import pytest
import torch

from tgedge.checkpoint import load_checkpoint, model_of
from tgedge.data import shapes
from tgedge.errors import TgedgeError
from tgedge.model.decoder import rope_inv_freq
from tgedge.reference import TorchPipeline


@pytest.fixture(scope="module")
def sample():
    return next(iter(shapes.generate(shapes.SPLIT_SEEDS["eval"], 1)))


def test_cpu_device_gives_todays_tokens(sample):
    default = TorchPipeline.from_checkpoint("demo")
    on_cpu = TorchPipeline.from_checkpoint("demo", device="cpu")
    assert on_cpu.dtype == torch.float32 and on_cpu.device.type == "cpu"
    options = default.options(max_new_tokens=8, eos_token_ids=[], stop_strings=[])
    tokens = default.answer(sample.image, sample.prompt, options).tokens
    assert on_cpu.answer(sample.image, sample.prompt, options).tokens == tokens and len(set(tokens)) > 1


def test_fp16_loaded_in_place(sample):
    """fp16 (what CUDA gets): weights and cache in fp16, rotary frequencies in fp32, numpy fp32 out, logits close."""
    ref = TorchPipeline.from_checkpoint("demo")
    half = TorchPipeline.from_checkpoint("demo", device="cpu", dtype="fp16")
    lm = half.model.language_model
    assert {p.dtype for p in half.model.parameters()} == {torch.float16}
    assert lm.inv_freq.dtype == torch.float32 and torch.equal(lm.inv_freq, rope_inv_freq(lm.cfg))
    x = ref.embeddings(ref.pre(sample.image, sample.prompt))
    assert half.embed_tokens(np.zeros((1, 3), np.int64)).dtype == np.float32
    ref.setup_cache(x.shape[1] + 1)
    half.setup_cache(x.shape[1] + 1)
    assert lm.layers[0].self_attn.kv_cache.k_cache.dtype == torch.float16
    want, got = ref.prefill(x), half.prefill(x)
    assert got.dtype == np.float32 and np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
    assert int(np.argmax(got)) == int(np.argmax(want))


def test_every_weight_loaded_elsewhere():
    """The placement path (built without weights, given memory, loaded): every parameter is the checkpoint's."""
    ckpt = load_checkpoint("demo")
    ref, wide = model_of(ckpt), model_of(ckpt, "cpu", torch.float64)
    theirs = dict(wide.named_parameters())
    assert all(torch.equal(p.double(), theirs[n]) for n, p in ref.named_parameters())


def test_cuda_without_cuda_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TgedgeError, match=r"^torch device cuda: this torch \(.*\) sees no CUDA device \(.*\)$"):
        TorchPipeline.from_checkpoint(tmp_path / "absent", device="cuda")  # said before the checkpoint is read
    with pytest.raises(TgedgeError, match="torch dtype 'int8': choose from fp32, fp16"):
        TorchPipeline.from_checkpoint(tmp_path / "absent", dtype="int8")
    with pytest.raises(TgedgeError, match="torch device 'mps': choose from cpu, cuda"):
        TorchPipeline.from_checkpoint(tmp_path / "absent", device="mps")
