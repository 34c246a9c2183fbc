"""Floor arithmetic on known sizes: Qwen2-0.5B's decoder and CLIP ViT-L/14-336, checked against hand counts."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tgedge.floors import (Floors, Peaks, decode_step_bytes, decoder_flops, graph_weight_bytes, kv_bytes_per_position,
                           measure_bandwidth, measure_flops, measure_read_bandwidth, vision_flops)

QWEN2_05B = dict(hidden_size=896, num_layers=24, intermediate_size=4864, num_heads=14, num_kv_heads=2, head_dim=64,
                 vocab_size=151936)
VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, image_size=336, patch_size=14,
                 num_channels=3, select_layer=-2)
# Qwen2-0.5B's MatMul weights outside the embedding: 494,032,768 parameters less the 136,134,656 of the table, less
# 27,648 q/k/v biases and 43,904 norm weights (the published count, docs/SCALE.md)
QWEN2_05B_LINEAR = 494_032_768 - 136_134_656 - 27_648 - 43_904


def test_kv_and_step_bytes():
    assert kv_bytes_per_position(24, 2, 64) == 2 * 24 * 2 * 64 * 4 == 24576
    assert kv_bytes_per_position(28, 2, 128, "float16") == 28672
    assert decode_step_bytes(1000, 10, 5) == 1050


def test_decoder_flops_of_qwen2_05b():
    head = 2 * 896 * 151936
    one = decoder_flops(QWEN2_05B, 1)  # the first position attends to itself
    assert one == 2 * QWEN2_05B_LINEAR + 24 * 4 * 14 * 64 * 1 + head
    # a decode step after 670 positions attends to 671; a prefill of 671 to 1 + 2 + ... + 671 in all
    assert decoder_flops(QWEN2_05B, 1, past=670) == 2 * QWEN2_05B_LINEAR + 24 * 4 * 14 * 64 * 671 + head
    assert decoder_flops(QWEN2_05B, 671) == 671 * 2 * QWEN2_05B_LINEAR + 24 * 4 * 14 * 64 * (671 * 672 // 2) + head
    assert decoder_flops(QWEN2_05B, 671, last_logits_only=False) == decoder_flops(QWEN2_05B, 671) + 670 * head


def test_vision_flops_of_vit_l_336():
    n, d = 577, 1024  # 24 x 24 patches and the class token; 23 layers up to the penultimate hidden state
    per_layer = 2 * n * (4 * d * d + 2 * d * 4096) + 4 * n * n * d
    patches = 2 * 576 * 3 * 14 * 14 * d
    assert vision_flops(VIT_L_336, 1) == patches + 23 * per_layer == 366_033_858_560
    assert vision_flops(VIT_L_336, 5) == 5 * vision_flops(VIT_L_336, 1)
    assert vision_flops({**VIT_L_336, "select_layer": -1}, 1) == patches + 24 * per_layer


def test_floors_from_peaks():
    f = Floors(Peaks(bandwidth=2e9, flops=1e11), weight_bytes=10**9, kv_per_position=24576)
    assert f.decode_step_s(0) == pytest.approx(0.5)
    assert f.decode_step_s(1000) == pytest.approx((10**9 + 24_576_000) / 2e9)
    assert f.compute_s(5e10) == pytest.approx(0.5)


def test_graph_weight_bytes_counts_inline_and_external(tmp_path):
    a = numpy_helper.from_array(np.zeros((3, 4), np.float32), "a")  # inline: 48 bytes
    b = TensorProto(name="b", data_type=TensorProto.FLOAT, dims=[100, 10], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "other.data"), ("offset", "0"), ("length", "4000")):
        b.external_data.add(key=k, value=v)
    graph = helper.make_graph([helper.make_node("Add", ["x", "a"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], [a, b])
    path = tmp_path / "g.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert graph_weight_bytes(path) == 48 + 4000


def test_measured_peaks_are_positive_and_finite():
    bandwidth, how = measure_bandwidth(16 << 20, repeats=2)
    flops, _ = measure_flops(256, repeats=2)
    assert np.isfinite(bandwidth) and bandwidth > 1e8 and "copy" in how
    assert np.isfinite(flops) and flops > 1e8
    read, how = measure_read_bandwidth(16 << 20, repeats=2, threads=1)
    assert np.isfinite(read) and read > 1e8 and "16 MiB read" in how and "threads: 1" in how


def test_the_floor_takes_the_higher_bandwidth(monkeypatch):
    """The decode floor uses the faster of the copy and the one-row MatMul read (each a measured lower bound on what
    the machine moves), and says which."""
    import tgedge.floors as floors

    monkeypatch.setattr(floors, "measure_bandwidth", lambda: (20e9, "copy"))
    monkeypatch.setattr(floors, "measure_flops", lambda: (1e11, "matmul"))
    monkeypatch.setattr(floors, "measure_read_bandwidth", lambda threads: (30e9, f"read, {threads} threads"))
    peaks = floors.measure_host(2)
    assert peaks.bandwidth == 30e9 and peaks.how["bandwidth"].startswith("read, 2 threads")
    assert "20.00 GB/s" in peaks.how["copy"] and "30.00 GB/s" in peaks.how["read"]
    monkeypatch.setattr(floors, "measure_read_bandwidth", lambda threads: (15e9, "read"))  # slower: the copy
    peaks = floors.measure_host()
    assert peaks.bandwidth == 20e9 and peaks.how["bandwidth"] == "copy" and "15.00 GB/s" in peaks.how["read"]
    monkeypatch.setattr(floors, "measure_read_bandwidth", lambda threads: None)  # no onnxruntime: the copy
    assert floors.measure_host().bandwidth == 20e9


def test_best_of_two_measurements():
    from tgedge.floors import best_of

    before = Peaks(20e9, 2e11, {"bandwidth": "copy", "flops": "matmul a"})
    after = Peaks(25e9, 1e11, {"bandwidth": "read", "flops": "matmul b"})
    best = best_of(before, after)
    assert (best.bandwidth, best.flops) == (25e9, 2e11)
    assert best.how["bandwidth"] == "read" and best.how["flops"] == "matmul a"
    assert "20.00 / 25.00 GB/s" in best.how["measured"] and "200.0 / 100.0 GFLOP/s" in best.how["measured"]


# -- the device's peaks: which path measures them (fakes: no GPU here) ---------------------------------------------
def test_floor_device_follows_the_backends():
    from tgedge.floors import floor_device

    assert floor_device(["onnxruntime", "torch"]) == "cpu"
    assert floor_device(["onnxruntime", "onnxruntime-cuda"]) == "cuda"
    assert floor_device(iter(["tensorrt"])) == "cuda"


def test_measure_peaks_picks_torch_then_onnxruntime_then_refuses(monkeypatch):
    from tgedge import floors
    from tgedge.errors import TgedgeError

    calls = []
    monkeypatch.setattr(floors, "measure_host", lambda threads=0: calls.append(("host", threads)) or "host")
    monkeypatch.setattr(floors, "cuda_peaks_torch", lambda torch: calls.append(("torch", torch)) or "torch peaks")
    monkeypatch.setattr(floors, "cuda_peaks_onnxruntime", lambda ort: calls.append(("ort", ort)) or "ort peaks")
    assert floors.measure_peaks("cpu", 3) == "host"
    monkeypatch.setattr(floors, "_torch_cuda", lambda: "TORCH")
    monkeypatch.setattr(floors, "_ort_cuda", lambda: "ORT")
    assert floors.measure_peaks("cuda") == "torch peaks"
    monkeypatch.setattr(floors, "_torch_cuda", lambda: None)
    assert floors.measure_peaks("cuda") == "ort peaks"
    assert calls == [("host", 3), ("torch", "TORCH"), ("ort", "ORT")]
    monkeypatch.setattr(floors, "_ort_cuda", lambda: None)
    with pytest.raises(TgedgeError, match="device floors need a CUDA device"):
        floors.measure_peaks("cuda")


def test_no_cuda_here_means_no_device_path():
    """This CI machine has no GPU: both probes say so (a GPU machine would take the device path)."""
    from tgedge import floors

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert floors._torch_cuda() is None


class _FakeCudaTorch:
    """Enough of torch for cuda_peaks_torch: CUDA events that report `ms` for every timed call, tensors as numpy."""
    float16 = np.float16

    def __init__(self, ms: float):
        ms_each = ms

        class Event:
            def __init__(self, enable_timing=False):
                pass

            def record(self):
                pass

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return ms_each

        class Cuda:
            synchronize = staticmethod(lambda: None)
            get_device_name = staticmethod(lambda: "Fake GPU")

        Cuda.Event = Event
        self.cuda, self.devices = Cuda(), []

    def ones(self, n, dtype, device):
        self.devices.append(device)
        return _FakeTensor(n)

    def empty_like(self, t):
        return _FakeTensor(t.n)

    def randn(self, n, m, dtype, device):
        self.devices.append(device)
        return _FakeTensor(n * m)

    def matmul(self, a, b):
        return a


class _FakeTensor:
    def __init__(self, n):
        self.n = n

    def copy_(self, other):
        return self


def test_cuda_peaks_torch_arithmetic():
    from tgedge.floors import cuda_peaks_torch

    fake = _FakeCudaTorch(ms=2.0)
    peaks = cuda_peaks_torch(fake, nbytes=1 << 20, n=64, repeats=3)
    assert set(fake.devices) == {"cuda"}
    assert peaks.bandwidth == pytest.approx(2 * (1 << 20) / 2e-3)  # read + write bytes over 2 ms
    assert peaks.flops == pytest.approx(2 * 64 ** 3 / 2e-3)
    assert "Fake GPU" in peaks.how["bandwidth"] and peaks.how["device"] == "Fake GPU"
