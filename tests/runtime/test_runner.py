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


class FakeCuda:
    """What the TensorRT runner asks of cuda-python, recording allocations (no GPU here)."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.mallocs, self.next = [], 4096

    def cudaMalloc(self, n):
        self.next += n + 256
        self.mallocs.append(self.next)
        return 0, self.next

    def cudaMemset(self, ptr, value, n):
        return (0,)

    def cudaMemcpy(self, dst, src, n, kind):
        return (0,)

    def cudaFree(self, ptr):
        return (0,)

    def cudaStreamCreate(self):
        return 0, 1

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)


class FakeEngine:
    """An engine of a static-cache decoder: its context records the addresses and the profile it is given."""

    class TensorIOMode:
        INPUT, OUTPUT = 0, 1

    def __init__(self, inputs, outputs):
        self.io = [(t.name, self.TensorIOMode.INPUT) for t in inputs] + [(t.name, self.TensorIOMode.OUTPUT)
                                                                         for t in outputs]
        self.shapes = {t.name: tuple(1 if isinstance(d, str) else d for d in t.shape) for t in outputs}
        self.num_io_tensors = len(self.io)
        self.addresses, self.profiles = {}, []
        self.nptype = lambda dtype: np.float32

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return dict(self.io)[name]

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self):
        return self

    def set_optimization_profile_async(self, profile, stream):
        self.profiles.append(profile)

    def set_input_shape(self, name, shape):
        pass

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def execute_async_v3(self, stream):
        return True


def _fake_decoder_engine(monkeypatch, engine_class, max_batch: int = 1):
    """The demo's static-onnx decoder contract and a TensorRTRunner over a fake engine and a fake CUDA."""
    from tgedge import demo_checkpoint
    from tgedge.checkpoint import load_model
    from tgedge.contract import StageContract
    from tgedge.runtime import tensorrt as rt
    from tgedge.runtime.tensorrt import TensorRTRunner

    model, _ = load_model(demo_checkpoint(), device="meta")
    contract = StageContract.from_config(model.cfg.to_dict(), 64, cache_mode="static-onnx")
    stage = contract.stages["decoder"]
    engine, cuda = engine_class(stage.inputs, stage.outputs), FakeCuda()
    monkeypatch.setattr(rt, "_cudart", lambda: cuda)
    runner = TensorRTRunner(lambda: (engine, engine), "decoder", list(stage.inputs), list(stage.outputs),
                            contract.cache.profile_for, max_batch)
    return contract, stage, engine, cuda, runner


def test_tensorrt_runner_binds_a_static_cache_in_place(monkeypatch):
    """The static cache on TensorRT: each buffer allocated once, given to the engine as the past input and the
    present output at the same address (KVCacheUpdate requires it), never allocated or copied back per step; the
    prefill and decode profiles chosen from the mask and step lengths. (A fake CUDA: no GPU here.)"""
    from tgedge.runtime.cache import StaticCache
    from tgedge.runtime.tensorrt import DeviceArray

    contract, stage, engine, cuda, runner = _fake_decoder_engine(monkeypatch, FakeEngine)
    cache = StaticCache(contract.cache)
    with runner:
        cache.reset(10, runner)
        assert cache.bound is not None and all(isinstance(b, DeviceArray) for b in cache.buffers.values())
        buffers, allocated = dict(cache.buffers), len(cuda.mallocs)
        width = stage.inputs[0].shape[2]
        for t in (4, 1, 1):
            out = runner.infer({"inputs_embeds": np.zeros((1, t, width), np.float32), **cache.feed(t)},
                               **cache.options)
            cache.update(out, t)
            for past, present in contract.cache.present_for().items():
                assert engine.addresses[past] == engine.addresses[present] == buffers[past].ptr
                assert out[present] is buffers[past]
        # per step: the mask and embeddings staged, the logits allocated; nothing of the cache
        assert len(cuda.mallocs) - allocated == 3 * 3
        assert engine.profiles == [0, 1]  # prefill, then decode (switched once)
        assert cache.buffers == buffers and cache.length == 6


def test_int8_kernels_saturate_only_on_x86_without_vnni():
    from tgedge.runtime.onnxrt import int8_kernels_saturate

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert int8_kernels_saturate(avx2)
    assert not int8_kernels_saturate(avx2.replace("avx2", "avx2 avx512f avx512_vnni"))
    assert not int8_kernels_saturate(avx2.replace("avx2", "avx2 avx_vnni"))
    assert not int8_kernels_saturate("processor\t: 0\n")  # no flags line: nothing known, fused as onnxruntime chooses
    with pytest.raises(TgedgeError, match="unknown int8 kernels 'fast'"):
        SessionFromOnnx("x.onnx", int8_kernels="fast")


def test_simulated_int8_kernels_disable_qdq_fusion(demo_export, monkeypatch):
    """`simulated` (and `auto` on a CPU whose kernels saturate) sets onnxruntime's disable_quant_qdq; `fused` never."""
    import onnxruntime as ort

    from tgedge.runtime import onnxrt

    seen = []
    real = ort.InferenceSession

    def session(src, so, providers):
        try:
            seen.append(so.get_session_config_entry("session.disable_quant_qdq"))
        except Exception:  # onnxruntime raises when the entry was never set
            seen.append(None)
        return real(src, so, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", session)
    path = demo_export.directory / "embed.onnx"
    for kernels, saturate in (("simulated", False), ("fused", True), ("auto", True), ("auto", False)):
        monkeypatch.setattr(onnxrt, "int8_kernels_saturate", lambda: saturate)
        SessionFromOnnx(path, int8_kernels=kernels)()
    assert seen == ["1", None, "1", None]


class BatchedFakeEngine(FakeEngine):
    """A decoder engine built with --max-batch: its logits have the call's batch."""

    def set_input_shape(self, name, shape):
        if name == "inputs_embeds":
            self.batch = shape[0]

    def get_tensor_shape(self, name):
        return (self.batch, *self.shapes[name][1:]) if name == "logits" else self.shapes[name]


def test_tensorrt_runner_binds_a_batched_caches_slots_by_address(monkeypatch):
    """Batched TensorRT engines (tgedge build --max-batch): one buffer per past/present pair for every slot, a
    slot's prefill bound at its rows' own address inside it, a decode step of rows 0..n at the buffer's start,
    each row range bound once, no cache allocated per step; the prefill and decode profiles chosen by shape. More
    slots than the engine's batch maximum, or an engine of one sequence, are refused with the flag that changes it.
    (A fake CUDA: no GPU here.)"""
    from tgedge.runtime.batched import BatchedDecoder, batching_problem
    from tgedge.runtime.tensorrt import DeviceArray

    contract, stage, engine, cuda, runner = _fake_decoder_engine(monkeypatch, BatchedFakeEngine, max_batch=4)
    width = stage.inputs[0].shape[2]

    class Pipe:
        runners = {"decoder": runner}

        def __init__(self):
            self.contract = contract

        def run_stage(self, name, feed, **options):
            return runner.infer(feed, **options)

        def embed_tokens(self, ids):
            return np.zeros((*ids.shape, width), np.float32)

    pipe = Pipe()
    with runner:
        assert batching_problem(pipe) is None
        decoder = BatchedDecoder(pipe, 3)
        assert all(isinstance(b, DeviceArray) and b.shape[0] == 3 for b in decoder.buffers.values())
        row = {n: b.nbytes // 3 for n, b in decoder.buffers.items()}
        slots = [decoder.acquire() for _ in range(3)]
        allocated = len(cuda.mallocs)
        decoder.prefill(slots[2], np.zeros((1, 5, width), np.float32))
        for past, present in contract.cache.present_for().items():
            assert engine.addresses[past] == engine.addresses[present] == decoder.buffers[past].ptr + 2 * row[past]
        decoder.prefill(slots[0], np.zeros((1, 3, width), np.float32))
        for _ in range(2):
            logits = decoder.decode({0: 7, 2: 7})
            assert set(logits) == {0, 2}
            for past, present in contract.cache.present_for().items():
                assert engine.addresses[past] == engine.addresses[present] == decoder.buffers[past].ptr
        assert decoder.lengths == [5, 0, 7]
        assert engine.profiles == [0, 1]  # both prefills under the prefill profile, then decode
        assert set(decoder._bound) == {(2, 3), (0, 1), (0, 3)}  # each range bound once
        # per call (2 prefills, 2 steps): the embeddings and the mask staged, the logits allocated; no cache buffer
        assert len(cuda.mallocs) - allocated == 4 * 3
        with pytest.raises(TgedgeError, match="at most 4 sequences per call .* --max-batch"):
            BatchedDecoder(pipe, 5)
        runner.max_batch = 1
        assert "tgedge build --max-batch N" in batching_problem(pipe)
