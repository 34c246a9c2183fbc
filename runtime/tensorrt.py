"""TensorRT backend: engines built by `tgedge build`, run with the named-tensor API of TensorRT 10+.

Device memory goes through cuda-python (`cuda.bindings.runtime`, or the older `cuda.cudart`). Outputs
named in `keep` stay on the device as `DeviceArray`s, so the decoder's present keys/values are bound as the
next step's past without a copy through the host. An engine is refused, before it is deserialised, when it
was built with another TensorRT version or for another GPU: engines are not portable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tgedge.contract import TensorMeta
from tgedge.errors import TgedgeError
from tgedge.runtime.manifest import Manifest
from tgedge.runtime.runner import BaseRunner, Bound, Rows

MODULES = {"tensorrt": ("tensorrt",), "tensorrt_rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}


def import_tensorrt(backend: str = "tensorrt"):
    """The TensorRT Python module for a backend (`tensorrt`: JetPack / PyPI TensorRT; `tensorrt_rtx`)."""
    import importlib

    for name in MODULES[backend]:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    hint = ("on Jetson it comes with JetPack (python3-libnvinfer); elsewhere pip install tensorrt"
            if backend == "tensorrt" else "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs")
    raise TgedgeError(f"the {backend} backend needs the {MODULES[backend][0]} Python module, which is not installed "
                      f"({hint})")


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    return cudart


def device_info() -> dict:
    """{"name", "compute_capability"} of GPU 0, or {} without a GPU or cuda-python."""
    cudart = _cudart()
    if cudart is None:
        return {}
    try:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count == 0:
            return {}
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) != 0:
            return {}
    except Exception:  # a driver that cannot start is "no GPU" here
        return {}
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def check_engine(graph: str, meta: dict, tensorrt_version: str, device: dict) -> None:
    """Refuse an engine built with another TensorRT or for another GPU, saying which and what to do."""
    built = f"{meta.get('gpu') or 'an unrecorded GPU'} (compute {meta.get('compute_capability') or '?'}) with " \
            f"{meta.get('backend', 'tensorrt')} {meta.get('tensorrt_version')}"
    here = f"{device.get('name') or 'no GPU'} (compute {device.get('compute_capability') or '?'}) with " \
           f"{tensorrt_version}"
    if meta.get("tensorrt_version") != tensorrt_version:
        raise TgedgeError(f"{graph} engine was built on {built}; this machine has {here}: TensorRT versions differ, "
                          f"rebuild the engines here with tgedge build")
    if not device:
        raise TgedgeError(f"{graph} engine needs a GPU; this machine has {here}")
    if meta.get("compute_capability") and meta["compute_capability"] != device.get("compute_capability"):
        raise TgedgeError(f"{graph} engine was built on {built}; this machine has {here}: engines are not portable "
                          f"across GPUs, rebuild them here with tgedge build")


def _check(result) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise TgedgeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class DeviceArray:
    """A tensor in GPU memory: what `infer(..., keep=...)` returns and accepts back as input."""

    def __init__(self, cudart, shape: tuple[int, ...], dtype: np.dtype):
        self.cudart, self.shape, self.dtype = cudart, tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ptr = _check(cudart.cudaMalloc(max(self.nbytes, 1)))  # TensorRT wants an address even when empty

    def tgedge_meta(self) -> tuple[str, tuple[int, ...]]:
        return self.dtype.name, self.shape

    @property
    def address(self) -> int:
        return int(self.ptr)

    def copy_from(self, host: np.ndarray) -> "DeviceArray":
        host = np.ascontiguousarray(host)
        if host.nbytes:
            _check(self.cudart.cudaMemcpy(self.ptr, host.ctypes.data, host.nbytes,
                                          self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return self

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        if self.nbytes:
            _check(self.cudart.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes,
                                          self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return out

    def __del__(self):
        try:
            self.cudart.cudaFree(self.ptr)
        except Exception:
            pass


class EngineFromManifest:
    """Lazy loader: the deserialised engine of one graph of an engine directory (`tgedge build`), refused before
    it is read when it was built with another TensorRT or for another GPU."""

    def __init__(self, manifest: Manifest, graph: str):
        if graph not in manifest.engines:
            raise TgedgeError(f"{manifest.directory}: no TensorRT engine for {graph!r} (build them with: tgedge build "
                              f"{manifest.directory} -o ENGINES)")
        self.path = manifest.directory / manifest.engines[graph]["file"]
        self.graph, self.meta = graph, manifest.engines[graph]

    def __call__(self):
        """-> (tensorrt module, engine)."""
        trt = import_tensorrt(self.meta.get("backend", "tensorrt"))
        check_engine(self.graph, self.meta, trt.__version__, device_info())
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise TgedgeError(f"{self.path.name}: TensorRT could not load this engine")
        return trt, engine


class TensorRTRunner(BaseRunner):
    """One engine; `select_profile(feed)` picks the optimisation profile of a call (the decoder's prefill or
    decode profile, from the manifest's KV cache layout)."""

    binds_rows = True  # bind(..., rows=): a batched KV cache's slots, by address

    def __init__(self, engine_loader: EngineFromManifest, name: str, inputs: list[TensorMeta],
                 outputs: list[TensorMeta], select_profile=None, max_batch: int = 1):
        super().__init__(name)
        self.loader, self.graph = engine_loader, name
        self.inputs, self.outputs_meta = inputs, outputs
        self.select_profile = select_profile
        self.max_batch = max_batch  # the engine's profiles' batch maximum (tgedge build --max-batch)

    def activate_impl(self) -> None:
        self.cudart = _cudart()
        if self.cudart is None:
            raise TgedgeError("the tensorrt backend needs cuda-python (pip install cuda-python)")
        self.trt, self.engine = self.loader()
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in self.names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.OUTPUT]
        self.profile = -1

    def deactivate_impl(self) -> None:
        self.context = self.engine = None
        self.cudart.cudaStreamDestroy(self.stream)

    def get_input_metadata_impl(self) -> dict[str, TensorMeta]:
        return {t.name: t for t in self.inputs}  # the engine was built from these

    def get_output_metadata_impl(self) -> dict[str, TensorMeta]:
        return {t.name: t for t in self.outputs_meta}

    def buffer(self, shape: tuple[int, ...], dtype: str) -> DeviceArray:
        """Device memory that stays between calls (a static KV cache's buffer), zeroed."""
        array = DeviceArray(self.cudart, shape, dtype)
        _check(self.cudart.cudaMemset(array.ptr, 0, max(array.nbytes, 1)))
        return array

    def bind(self, buffers: dict[str, DeviceArray], outputs: dict[str, str], rows: tuple[int, int] | None = None
             ) -> Bound:
        """Each buffer is the input of its name and the output `outputs[name]` at the same address: the engine's
        KVCacheUpdate layers (the static-onnx decoder's TensorScatter) write it in place, which they require.
        `rows` (start, stop): only those rows of each buffer (`Rows` at their address: a batched cache's slots)."""
        if rows is None:
            return Bound(None, dict(buffers), [outputs[n] for n in buffers])
        fed = {name: Rows.of(value, rows, value.dtype.name, value.shape, value.address)
               for name, value in buffers.items()}
        return Bound(None, fed, [outputs[n] for n in buffers])

    def infer_impl(self, feed: dict[str, Any], keep: tuple[str, ...] = (), bound: Bound | None = None
                   ) -> dict[str, Any]:
        """With `bound`, its outputs are its buffers (not allocated, not copied back) and come back as they are."""
        if self.select_profile is not None:
            profile = self.select_profile(feed)
            if profile != self.profile:
                self.context.set_optimization_profile_async(profile, self.stream)
                self.profile = profile
        staged = []
        for name, value in feed.items():
            if isinstance(value, np.ndarray):
                value = DeviceArray(self.cudart, value.shape, value.dtype).copy_from(value)
                staged.append(value)  # freed when this call returns
            self.context.set_input_shape(name, value.shape)
            self.context.set_tensor_address(name, int(value.address))
        fixed = bound.output_buffers() if bound is not None else {}
        outputs = {}
        for name in self.outputs:
            if name in fixed:
                outputs[name] = fixed[name]
            else:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
                outputs[name] = DeviceArray(self.cudart, shape, dtype)
            self.context.set_tensor_address(name, int(outputs[name].address))
        if not self.context.execute_async_v3(self.stream):
            raise TgedgeError(f"{self.graph}: TensorRT execution failed")
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return {n: (v if n in keep or n in fixed else v.numpy()) for n, v in outputs.items()}


def runner_for(manifest: Manifest, graph: str, threads: int = 0, spin: bool = True) -> TensorRTRunner:
    """The backend registry's door (tgedge.runtime.backends): one engine of an engine directory. `threads` and
    `spin` are onnxruntime's host-thread settings: an engine runs on the GPU and has no use for them."""
    entry, contract = manifest.graphs[graph], manifest.contract
    select = None
    if graph == "decoder":
        select = contract.cache.profile_for
    return TensorRTRunner(EngineFromManifest(manifest, graph), graph, entry.inputs, entry.outputs, select,
                          manifest.engine_batch(graph))
