"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers.

Inference goes through IO binding: outputs named in `keep` stay as OrtValues where ORT put them (on the
GPU with CUDA/TensorRT), so the decoder's `present.*` feed the next step's `past_key_values.*` without a
copy through the host. A static KV cache goes further: `buffer()` allocates its buffers on the session's device once
and `bind()` binds each as both a past input and its present output, once; `infer(feed, bound=...)` then binds only
the step's own inputs, and the graph writes the cache in place. With `cuda_graph` (onnxruntime's CUDA provider, a
`static` decoder) the decode step is captured once as a CUDA graph and replayed per token (`runtime.cudagraph`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tgedge.contract import TensorMeta
from tgedge.errors import TgedgeError
from tgedge.fileio import regular_file
from tgedge.runtime.runner import BaseRunner, Bound, Rows, describe_array

ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool"}

# device -> execution providers, most preferred first; ORT falls back along the list per node.
DEVICES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


# How int8 (Q/DQ) graphs run on the CPU: `fused` lets onnxruntime fuse DequantizeLinear -> op -> QuantizeLinear into
# its integer kernels; `simulated` runs each op in fp32 on the dequantised values (session.disable_quant_qdq), which is
# what TensorRT's int8 computes (int32 accumulation, no overflow). On x86-64 without VNNI onnxruntime's integer kernels
# multiply with VPMADDUBSW, whose int16 pair sums saturate (onnxruntime's quantization docs). Measured on such a CPU
# (AMD EPYC, AVX2 only; docs/QUANTIZATION.md): demo-gated's int8 text guide min cosine 0.9974 fused, 0.9996 simulated;
# tests/model/test_gated.py's random gated checkpoint's int8 fusion 0.981 fused (the int8 policy's limit is 0.99; it passed
# on a VNNI CPU), passing simulated. `auto`: simulated exactly where the kernels saturate.
INT8_KERNELS = ("auto", "fused", "simulated")


@functools.lru_cache(maxsize=1)
def _host_cpuinfo() -> str:
    """This host's /proc/cpuinfo on x86-64 (read once: every session of every graph asks), else ''."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def int8_kernels_saturate(cpuinfo: str | None = None) -> bool:
    """True on an x86-64 CPU whose flags show no VNNI (avx512_vnni, avx_vnni, amx_int8): onnxruntime's u8s8 kernels
    there sum pairs of products in int16 and saturate. Elsewhere (Arm's dot-product kernels, VNNI) they do not."""
    cpuinfo = _host_cpuinfo() if cpuinfo is None else cpuinfo
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool(flags) and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def _meta(arg) -> TensorMeta:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
    return TensorMeta(arg.name, ORT_DTYPES.get(arg.type, arg.type), shape)


class SessionFromOnnx:
    """Lazy loader: an `onnxruntime.InferenceSession` for a graph on a device (`cpu`, `cuda`, `trt`)."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0, trt_cache: str | Path | None = None,
                 spin: bool = True, rewrite: Callable[[Any], Any] | None = None, in_order: bool = False,
                 int8_kernels: str = "auto", cuda_graph: bool = False):
        """`threads`: intra-op threads (0: onnxruntime's default, one per core); `spin` False: idle threads block
        instead of spinning (what a CPU shared with other work wants). `rewrite`: a function of the graph's
        structure (an `onnx.ModelProto` without its weights) that returns the structure to load instead; its
        external weights are still read from beside `path`, never copied. `in_order`: run the nodes in the graph's
        own order (onnxruntime's priority-based order) instead of its default topological order, which may run a
        node long after its input was made and so keep that input in memory meanwhile. `int8_kernels`: how Q/DQ
        graphs run on the CPU (`INT8_KERNELS`). `cuda_graph`: the CUDA provider's `enable_cuda_graph` (the runner
        then captures decode steps and replays them; `runtime.cudagraph`)."""
        if device not in DEVICES:
            raise TgedgeError(f"unknown onnxruntime device {device!r} (choose from {', '.join(DEVICES)})")
        if int8_kernels not in INT8_KERNELS:
            raise TgedgeError(f"unknown int8 kernels {int8_kernels!r} (choose from {', '.join(INT8_KERNELS)})")
        if cuda_graph and device != "cuda":
            raise TgedgeError(f"CUDA graphs run on onnxruntime's CUDA provider (device cuda), not {device!r}")
        self.int8_kernels, self.cuda_graph = int8_kernels, cuda_graph
        self.path, self.device, self.threads, self.trt_cache = Path(path), device, threads, trt_cache
        self.spin, self.rewrite, self.in_order = spin, rewrite, in_order

    def __call__(self):
        import onnxruntime as ort

        wanted = DEVICES[self.device]
        if wanted[0] not in ort.get_available_providers():
            raise TgedgeError(f"{wanted[0]} is not available in this onnxruntime ({ort.__version__}: "
                              f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for CUDA/TensorRT")
        providers: list[Any] = list(wanted)
        if self.device == "trt":
            opts = {"trt_fp16_enable": "True", "trt_engine_cache_enable": "True"}
            if self.trt_cache:
                opts["trt_engine_cache_path"] = str(self.trt_cache)
            providers[0] = ("TensorrtExecutionProvider", opts)
        if self.cuda_graph:
            providers[0] = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"})
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
        if not self.spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.in_order:
            so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        if self.device == "cpu" and (self.int8_kernels == "simulated"
                                     or (self.int8_kernels == "auto" and int8_kernels_saturate())):
            so.add_session_config_entry("session.disable_quant_qdq", "1")  # a graph without Q/DQ runs as before
        source: str | bytes = str(self.path)
        regular_file(self.path, "graph file")  # with --no-verify nothing has read it yet: a FIFO would block
        if self.rewrite is not None:
            import onnx

            source = self.rewrite(onnx.load(str(self.path), load_external_data=False)).SerializeToString()
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path.parent))
        try:
            return ort.InferenceSession(source, so, providers=providers)
        except Exception as e:  # ORT raises its own exception types per failure; all mean "cannot load"
            raise TgedgeError(f"{self.path}: onnxruntime cannot load this graph ({str(e).splitlines()[0]})") from None


class OnnxRuntimeRunner(BaseRunner):
    def __init__(self, session_loader: SessionFromOnnx, name: str | None = None):
        super().__init__(name or session_loader.path.stem)
        self.loader = session_loader
        self.session = None
        self.graph = None  # the decode step's CUDA graph binding (runtime.cudagraph.GraphStep), made at its first step
        self._uncaptured = None  # run options of every other call when the session captures graphs

    @property
    def device_type(self) -> str:
        return "cpu" if self.loader.device == "cpu" else "cuda"

    def activate_impl(self) -> None:
        self.session = self.loader()
        self.output_names = [o.name for o in self.session.get_outputs()]
        if getattr(self.loader, "cuda_graph", False):
            import onnxruntime as ort

            from tgedge.runtime.cudagraph import NO_GRAPH, run_options

            self._uncaptured = run_options(ort, NO_GRAPH)

    def deactivate_impl(self) -> None:
        self.session, self.graph, self._uncaptured = None, None, None

    def describe_value(self, value: Any) -> tuple[str, tuple[int, ...]]:
        if callable(getattr(value, "data_type", None)) and callable(getattr(value, "shape", None)):  # an OrtValue
            return ORT_DTYPES.get(value.data_type(), value.data_type()), tuple(value.shape())
        return describe_array(value)

    def get_input_metadata_impl(self) -> dict[str, TensorMeta]:
        return {i.name: _meta(i) for i in self.session.get_inputs()}

    def get_output_metadata_impl(self) -> dict[str, TensorMeta]:
        return {o.name: _meta(o) for o in self.session.get_outputs()}

    def buffer(self, shape: tuple[int, ...], dtype: str):
        """A tensor on the session's device that stays there between calls (a static KV cache's buffer)."""
        import onnxruntime as ort

        if self.device_type == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))  # the array's memory, zeroed
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(dtype).type, self.device_type, 0)

    binds_rows = True  # bind(..., rows=): a batched KV cache's slots

    def bind(self, buffers: dict[str, Any], outputs: dict[str, str], rows: tuple[int, int] | None = None) -> Bound:
        """Bind each buffer once as the input of its name and as the output `outputs[name]` (past and present in
        one buffer: onnxruntime's kernels see the same address and write in place). `rows` (start, stop): only
        those rows of each buffer, bound by address (`Rows`, what the feed then gives for the buffer)."""
        io = self.session.io_binding()
        fed: dict[str, Any] = {}
        for name, value in buffers.items():
            if rows is None:
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(outputs[name], value)
                fed[name] = value
                continue
            dtype, shape = self.describe_value(value)
            view = Rows.of(value, rows, dtype, shape, value.data_ptr())
            where = (self.device_type, 0, np.dtype(dtype).type, list(view.shape), view.address)
            io.bind_input(name, *where)
            io.bind_output(outputs[name], *where)
            fed[name] = view
        return Bound(io, fed, [outputs[n] for n in buffers])

    def infer_impl(self, feed: dict[str, Any], keep: tuple[str, ...] = (), bound: Bound | None = None
                   ) -> dict[str, Any]:
        """Outputs as numpy arrays, except those named in `keep`: OrtValues left on the device. With `bound`, its
        buffers are not bound again and its outputs come back as those buffers. With CUDA graphs, a step of one
        position on bound buffers replays the captured decode step (`_graph_step`)."""
        if self._uncaptured is not None and bound is not None and self.describe_value(
                feed["inputs_embeds"])[1][1] == 1:
            return self._graph_step(feed, bound)
        if bound is None:
            binding, fixed, order = self.session.io_binding(), {}, []
        else:
            binding, fixed, order = bound.io, bound.inputs, bound.order
        for name, value in feed.items():
            if fixed.get(name) is value:
                continue
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            if bound is None or name not in bound.outputs:
                binding.bind_output(name, self.device_type)  # rebinding a name keeps its place in the binding
                if name not in order:
                    order.append(name)
        self.session.run_with_iobinding(binding, self._uncaptured)
        outputs = dict(zip(order, binding.get_outputs()))
        if bound is not None:
            outputs.update(bound.output_buffers())
        return {n: (outputs[n] if n in keep or (bound is not None and n in bound.outputs) else outputs[n].numpy())
                for n in self.output_names}


    def _graph_step(self, feed: dict[str, Any], bound: Bound) -> dict[str, Any]:
        """A decode step through the captured graph: its inputs written into fixed buffers, nothing bound or
        allocated (the binding is made once per cache binding)."""
        import onnxruntime as ort

        from tgedge.runtime.cudagraph import GraphStep

        if self.graph is None or self.graph.bound is not bound:
            meta = self.get_output_metadata()["logits"]
            shape = (1, 1, int(meta.shape[-1]))
            self.graph = GraphStep(self, bound, self.describe_value(feed["inputs_embeds"])[0], "logits", shape,
                                   meta.dtype, ort)
        logits = self.graph.run(self.session, feed["inputs_embeds"], self.describe_value(feed["attention_mask"])[1][1])
        presents = bound.output_buffers()
        return {n: logits.numpy() if n == "logits" else presents[n] for n in self.output_names}


def runner_for(manifest, graph: str, device: str = "cpu", cuda_graph: bool = False,
               **loader_options) -> OnnxRuntimeRunner:
    """The backend registry's door (tgedge.runtime.backends): a graph of an export directory on a device;
    `loader_options` are SessionFromOnnx's (threads, spin, in_order, rewrite, trt_cache). `cuda_graph`: the decoder of
    a `static` export decodes through CUDA graphs (the other graphs run as before)."""
    if cuda_graph and graph == "decoder":
        mode = getattr(getattr(manifest, "contract", None), "cache", None)
        if getattr(mode, "mode", None) != "static":
            raise TgedgeError(f"CUDA graphs need a decoder exported with --cache static (this one: "
                              f"{getattr(mode, 'mode', 'unknown')}): its mask may then be of fixed size")
    return OnnxRuntimeRunner(SessionFromOnnx(manifest.graph_path(graph), device,
                                             cuda_graph=cuda_graph and graph == "decoder", **loader_options), graph)
