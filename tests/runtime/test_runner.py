"""The runner contract: activate / infer / deactivate, inputs checked against the graph's metadata."""

import numpy as np
import pytest

from tgedge.errors import TgedgeError, TgedgeInternalError
from tgedge.runtime.onnxrt import OnnxRuntimeRunner, SessionFromOnnx


@pytest.fixture(scope="module")
def decoder(demo_export):
    with OnnxRuntimeRunner(SessionFromOnnx(demo_export.manifest.graph_path("decoder")), "decoder") as runner:
        yield runner


def feed(runner, past=3, seq=2, dtype=np.float32):
    meta = runner.get_input_metadata()
    d = meta["inputs_embeds"].shape[2]
    f = {"inputs_embeds": np.zeros((1, seq, d), np.float32),
         "attention_mask": np.ones((1, past + seq), np.int64),
         "position_ids": np.arange(past, past + seq)[None]}
    for name, m in meta.items():
        if name.startswith("past_key_values."):
            f[name] = np.zeros((1, m.shape[1], past, m.shape[3]), dtype)
    return f


def test_infer_returns_named_outputs(decoder):
    out = decoder.infer(feed(decoder))
    assert out["logits"].shape[:2] == (1, 1)  # the last position's logits only
    assert out["present.0.key"].shape[2] == 5  # past 3 + 2 new


def test_wrong_dtype_names_input_got_and_expected(decoder):
    f = feed(decoder, dtype=np.float16)
    with pytest.raises(TgedgeError, match=r"decoder input 'past_key_values.0.key' \| got float16 \(1, 2, 3, 32\) \| "
                                          r"expected float32 \(batch_size, 2, past_sequence_length, 32\)$"):
        decoder.infer(f)


def test_symbolic_dim_must_agree_across_inputs(decoder):
    f = feed(decoder)
    f["position_ids"] = np.arange(3)[None]  # sequence_length 3 here, 2 in inputs_embeds
    with pytest.raises(TgedgeError, match=r"decoder input .position_ids. .* \| sequence_length is 2 in .inputs_embeds.$"):
        decoder.infer(f)


def test_missing_and_unexpected_inputs(decoder):
    f = feed(decoder)
    f["extra"] = f.pop("attention_mask")
    with pytest.raises(TgedgeError, match=r"missing \['attention_mask'\] \| unexpected \['extra'\]"):
        decoder.infer(f)


def test_infer_needs_activate(demo_export):
    runner = OnnxRuntimeRunner(SessionFromOnnx(demo_export.manifest.graph_path("embed")))
    with pytest.raises(TgedgeInternalError, match="must be activated"):
        runner.infer({"input_ids": np.zeros((1, 1), np.int64)})


def test_unavailable_provider_is_a_clear_error(demo_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(TgedgeError, match="CUDAExecutionProvider is not available"):
        OnnxRuntimeRunner(SessionFromOnnx(demo_export.manifest.graph_path("embed"), "cuda")).activate()


def test_io_differences_rank_or_full_shape():
    from tgedge.runtime.manifest import TensorMeta, io_differences

    listed = [TensorMeta("input_ids", "int64", ("batch_size", "sequence_length"))]
    same_rank = [TensorMeta("input_ids", "int64", (1, "sequence_length"))]
    assert io_differences(listed, same_rank, full_shape=False) == []
    assert io_differences(listed, same_rank, full_shape=True) == [
        "input_ids int64 shape ('batch_size', 'sequence_length')", "input_ids int64 shape (1, 'sequence_length')"]
    assert io_differences(listed, [TensorMeta("input_ids", "int32", ("b", "s"))], full_shape=False) == [
        "input_ids int32 rank 2", "input_ids int64 rank 2"]
    two = listed + [TensorMeta("mask", "int64", ("b",))]
    assert io_differences(two, two[::-1], full_shape=False) == ["same tensors in another order"]
