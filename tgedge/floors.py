"""Floors: the least time a stage can take on this machine, from what it must move or compute and what the machine
measurably does, measured in the same run as the figures they judge (`tgedge bench`).

- **Decode** is memory-bound at batch 1: a step reads every weight of the decoder once (the LM head's table
  included) and the KV cache at the current context, so its floor is those bytes / the measured memory bandwidth:
  the higher of a large copy (read + write bytes / time, one thread) and a large read by onnxruntime's own fp32
  MatMul of one row (a decode step's kernel: every weight byte read once, with the bench's threads), each the best
  of a few. The copy alone understates what a multi-threaded read reaches (its writes cost read-for-ownership
  traffic it does not count), which put decoders at 1.5x "of floor".
- **Vision** and **prefill** are compute-bound: their floor is their FLOPs / the measured peak FLOP/s (a large
  matmul). FLOPs count the matmuls (2 per multiply-add): linear layers, attention scores and values, the patch
  convolution; norms, activations and softmax are left out (small, and memory-bound).

On a GPU backend (onnxruntime's CUDA or TensorRT provider, TensorRT) the peaks are the device's (`measure_peaks`):
a device-to-device copy for bandwidth (read + write bytes, as the host's copy) and an fp16 GEMM for FLOP/s, through
torch where it sees the device, else through onnxruntime's CUDA provider (an Add and a MatMul bound to device
buffers).

A ratio to the floor is floor time / measured time (1.0 = at the floor). These are roofline floors from measured
peaks, not promises: a kernel can beat a copy's bandwidth when weights stay in cache, and no kernel reaches the
large-matmul peak at every shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}


@dataclass
class Peaks:
    """What the machine measurably does: bytes/s (the higher of a large copy and a large read; `how` says which)
    and FLOP/s of a large matmul."""
    bandwidth: float
    flops: float
    how: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"bandwidth_gb_s": round(self.bandwidth / 1e9, 2), "peak_gflop_s": round(self.flops / 1e9, 1),
                "how": self.how}


def best_time(fn, repeats: int) -> float:
    fn()  # first touch: page faults and thread start-up are no part of a peak
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> tuple[float, str]:
    """Host memory bandwidth: the best of `repeats` numpy copies of `nbytes` (far past the caches), counting the
    bytes read and written."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    seconds = best_time(lambda: np.copyto(dst, src), repeats)
    return 2 * nbytes / seconds, f"numpy copy of {nbytes >> 20} MiB, best of {repeats} (read + write bytes)"


def measure_read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5, threads: int = 0) -> tuple[float, str] | None:
    """Host read bandwidth as a decode step reads its weights: onnxruntime's fp32 MatMul of one row by a (K, N)
    weight of `nbytes` (each byte read once), the best of `repeats`, with `threads` intra-op threads (0: its
    default). None without onnxruntime."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    k = 4096
    weight = np.full((k, nbytes // (4 * k)), 1e-3, np.float32)
    read_bytes = weight.nbytes
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "read",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model, graph, weight
    x = {"x": np.ones((1, k), np.float32)}
    seconds = best_time(lambda: session.run(None, x), repeats)
    return read_bytes / seconds, (f"onnxruntime fp32 MatMul 1x{k} by {k}x{nbytes // (4 * k)} ({nbytes >> 20} MiB read), "
                              f"best of {repeats}, threads: {threads or 'default'}")


def measure_flops(n: int = 2048, repeats: int = 5) -> tuple[float, str]:
    """Host peak: the best of `repeats` fp32 (n, n) @ (n, n) matmuls through numpy's BLAS (all its threads)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    out = np.empty((n, n), np.float32)
    seconds = best_time(lambda: np.matmul(a, b, out=out), repeats)
    return 2 * n ** 3 / seconds, f"numpy fp32 matmul {n}x{n}x{n}, best of {repeats}"


def measure_host(threads: int = 0) -> Peaks:
    """The machine's peaks; `threads`: the intra-op threads the models run with (the read's)."""
    copy, how_copy = measure_bandwidth()
    read = measure_read_bandwidth(threads=threads)
    how = {"copy": f"{how_copy}: {copy / 1e9:.2f} GB/s"}
    bandwidth, how["bandwidth"] = copy, how_copy
    if read is not None:
        how["read"] = f"{read[1]}: {read[0] / 1e9:.2f} GB/s"
        if read[0] > copy:
            bandwidth, how["bandwidth"] = read[0], f"{read[1]}; the copy: {copy / 1e9:.2f} GB/s"
    flops, how["flops"] = measure_flops()
    return Peaks(bandwidth, flops, how)


# -- the device's peaks (a GPU backend's floors) -------------------------------------------------------------------
GPU_BACKENDS = ("onnxruntime-cuda", "onnxruntime-trt", "tensorrt")


def floor_device(backends) -> str:
    """Where the floors of a run over these backends are measured: `cuda` if any runs on the GPU, else `cpu`."""
    return "cuda" if any(b in GPU_BACKENDS for b in backends) else "cpu"


def _torch_cuda():
    """torch, if it is installed and sees a CUDA device; else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _ort_cuda():
    """onnxruntime, if its CUDA execution provider is present; else None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return ort if "CUDAExecutionProvider" in ort.get_available_providers() else None


def cuda_peaks_torch(torch, nbytes: int = 1 << 30, n: int = 8192, repeats: int = 10) -> Peaks:
    """The device's peaks through torch: a device-to-device copy of `nbytes` (read + write bytes) and an fp16
    (n, n) @ (n, n) GEMM, each the best of `repeats`, timed by CUDA events."""
    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return best

    src = torch.ones(nbytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * nbytes / timed(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(n, n, dtype=torch.float16, device="cuda")
    b = torch.randn(n, n, dtype=torch.float16, device="cuda")
    gemm = 2 * n ** 3 / timed(lambda: torch.matmul(a, b))
    name = torch.cuda.get_device_name()
    how = {"bandwidth": f"torch device-to-device copy of {nbytes >> 20} MiB on {name}, best of {repeats} (read + "
                        f"write bytes): {copy / 1e9:.1f} GB/s",
           "flops": f"torch fp16 matmul {n}x{n}x{n} on {name}, best of {repeats}", "device": name}
    return Peaks(copy, gemm, how)


def cuda_peaks_onnxruntime(ort, nbytes: int = 1 << 28, n: int = 4096, repeats: int = 10) -> Peaks:
    """The device's peaks through onnxruntime's CUDA provider: an fp16 Add of a zero scalar over `nbytes` (read +
    write bytes) and an fp16 (n, n) MatMul, inputs and outputs bound to device buffers, each the best of `repeats`
    (wall time of a synchronous run: launch overhead included, so a lower bound of the peaks)."""
    from onnx import TensorProto, helper

    def session(node, inputs, output_shape):
        graph = helper.make_graph([node], "peak", [helper.make_tensor_value_info(i, TensorProto.FLOAT16, s)
                                                   for i, s in inputs],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT16, output_shape)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        io = sess.io_binding()
        for name, shape in inputs:
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ones(shape, np.float16), "cuda", 0))
        io.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_shape_and_type(output_shape, np.float16, "cuda", 0))
        return lambda: sess.run_with_iobinding(io)

    elements = nbytes // 2
    copy = 2 * nbytes / best_time(session(helper.make_node("Add", ["x", "z"], ["y"]), [("x", [elements]), ("z", [1])],
                                          [elements]), repeats)
    gemm = 2 * n ** 3 / best_time(session(helper.make_node("MatMul", ["a", "b"], ["y"]), [("a", [n, n]), ("b", [n, n])],
                                          [n, n]), repeats)
    how = {"bandwidth": f"onnxruntime CUDA fp16 Add over {nbytes >> 20} MiB, device buffers, best of {repeats} "
                        f"(read + write bytes): {copy / 1e9:.1f} GB/s",
           "flops": f"onnxruntime CUDA fp16 MatMul {n}x{n}x{n}, best of {repeats}", "device": "cuda (onnxruntime)"}
    return Peaks(copy, gemm, how)


def measure_device() -> Peaks:
    """The CUDA device's peaks: through torch where it sees the device, else through onnxruntime's CUDA provider."""
    torch = _torch_cuda()
    if torch is not None:
        return cuda_peaks_torch(torch)
    ort = _ort_cuda()
    if ort is not None:
        return cuda_peaks_onnxruntime(ort)
    from tgedge.errors import TgedgeError

    raise TgedgeError("device floors need a CUDA device: neither torch nor onnxruntime (CUDAExecutionProvider) sees "
                      "one")


def measure_peaks(device: str = "cpu", threads: int = 0) -> Peaks:
    """The peaks floors are measured against: the host's (`cpu`) or the CUDA device's (`cuda`)."""
    return measure_device() if device == "cuda" else measure_host(threads)


def best_of(before: Peaks, after: Peaks) -> Peaks:
    """Each peak at its higher of two measurements (the bench takes one before its runs and one after: a shared
    host's bandwidth drifts with its neighbours' load, and a floor is the least time the machine showed)."""
    bandwidth, flops = max(before.bandwidth, after.bandwidth), max(before.flops, after.flops)
    how = dict(after.how if after.bandwidth > before.bandwidth else before.how)
    how["flops"] = (after if after.flops > before.flops else before).how.get("flops")
    how["measured"] = (f"before and after the runs, the higher taken: bandwidth {before.bandwidth / 1e9:.2f} / "
                       f"{after.bandwidth / 1e9:.2f} GB/s, peak {before.flops / 1e9:.1f} / {after.flops / 1e9:.1f} "
                       "GFLOP/s")
    return Peaks(bandwidth, flops, how)


# -- what a stage must move or compute --------------------------------------------------------------------------
def graph_weight_bytes(path: str | Path) -> int:
    """Bytes of an ONNX graph's initializers (inline or external, shared tables included): what a call reads."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in proto.graph.initializer:
        length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        if length is None:
            length = len(t.raw_data) if t.raw_data else int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(
                t.data_type).itemsize
        total += length
    return total


def kv_bytes_per_position(layers: int, kv_heads: int, head_dim: int, dtype: str = "float32") -> int:
    """Keys and values of one position across the layers."""
    return 2 * layers * kv_heads * head_dim * ITEMSIZE[dtype]


def decode_step_bytes(weight_bytes: int, kv_per_position: int, context: int) -> int:
    """A decode step at `context` cached positions reads every weight once and the cache up to the context."""
    return weight_bytes + kv_per_position * context


def decoder_flops(dec: dict, new: int, past: int = 0, last_logits_only: bool = True) -> float:
    """FLOPs of a decoder call over `new` positions after `past` (the config dict's `decoder`): the linear layers for
    every new position, causal attention over past + the positions before it, the LM head (last position only)."""
    d, layers, inter = dec["hidden_size"], dec["num_layers"], dec["intermediate_size"]
    h, hkv, hd = dec["num_heads"], dec["num_kv_heads"], dec["head_dim"]
    linear = d * h * hd + 2 * d * hkv * hd + h * hd * d + 3 * d * inter  # q, k, v, o, gate, up, down (per layer)
    keys = new * past + new * (new + 1) // 2  # sum over new positions of the positions each attends to
    attention = 4 * h * hd * keys  # scores and values, 2 FLOPs per multiply-add each
    head = 2 * d * dec["vocab_size"] * (1 if last_logits_only else new)
    return float(layers * (2 * new * linear + attention) + head)


def vision_flops(vis: dict, views: int) -> float:
    """FLOPs of a CLIP ViT over `views` images up to the layer the features come from (the config's `vision`)."""
    d, inter, p, c = vis["hidden_size"], vis["intermediate_size"], vis["patch_size"], vis["num_channels"]
    patches = (vis["image_size"] // p) ** 2
    n = patches + 1  # the class token
    layers = vis["select_layer"] % (vis["num_layers"] + 1)
    per_layer = 2 * n * (4 * d * d + 2 * d * inter) + 4 * n * n * d
    return float(views * (2 * patches * c * p * p * d + layers * per_layer))


@dataclass
class Floors:
    """A model's floors on a machine: seconds per stage call and decode step."""
    peaks: Peaks
    weight_bytes: int  # the decoder graph's
    kv_per_position: int

    def decode_step_s(self, context: int) -> float:
        return decode_step_bytes(self.weight_bytes, self.kv_per_position, context) / self.peaks.bandwidth

    def compute_s(self, flops: float) -> float:
        return flops / self.peaks.flops
