"""One runner interface for every backend (Polygraphy style).

    with OnnxRuntimeRunner(SessionFromOnnx(path), name="vision") as runner:
        outputs = runner.infer({"pixel_values": pixels})

Backends implement `activate_impl`, `infer_impl`, `deactivate_impl` and `get_input_metadata_impl`;
inputs are checked here, against the graph's own metadata, before the backend sees them. This module imports
no backend: a runner that hands out device arrays describes them itself (`describe_value`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tgedge.contract import TensorMeta
from tgedge.errors import TgedgeError, TgedgeInternalError


def describe_array(value: Any) -> tuple[str, tuple[int, ...]]:
    """(numpy dtype name, shape) of a numpy array or a device array of tgedge's own runners (`tgedge_meta`)."""
    if isinstance(value, np.ndarray):
        return value.dtype.name, tuple(value.shape)
    meta = getattr(value, "tgedge_meta", None)
    if callable(meta):
        return meta()
    raise TgedgeError(f"cannot feed a {type(value).__name__} (expected a numpy array)")


def check_feed(graph: str, feed: dict[str, Any], expected: dict[str, TensorMeta],
               describe=describe_array) -> None:
    """Names, dtypes, ranks and static dims; one symbolic dim must have one value across all inputs."""
    missing = [n for n in expected if n not in feed]
    unexpected = [n for n in feed if n not in expected]
    if missing or unexpected:
        raise TgedgeError(f"{graph} inputs | missing {missing or 'none'} | unexpected {unexpected or 'none'} | "
                          f"expected {list(expected)}")
    bound: dict[str, tuple[int, str]] = {}  # symbolic dim -> (value, the input that set it)
    for name, meta in expected.items():
        dtype, shape = describe(feed[name])
        problem = ""
        if dtype != meta.dtype or len(shape) != len(meta.shape) or any(
                isinstance(want, int) and got != want for got, want in zip(shape, meta.shape)):
            problem = " "
        else:
            for got, want in zip(shape, meta.shape):
                value, source = bound.setdefault(want, (got, name)) if isinstance(want, str) else (got, name)
                if value != got:
                    problem = f" | {want} is {value} in {source!r}"
                    break
        if problem:
            raise TgedgeError(f"{graph} input {name!r} | got {dtype} {shape} | expected {meta.describe()}"
                              + problem.rstrip())


class Bound:
    """Buffers bound once as inputs (`inputs`: name -> buffer) and, the same memory, as outputs (`outputs`, in the
    inputs' order): a static KV cache's past and present. `io`: the backend's own binding object, if it has one."""

    def __init__(self, io, inputs: dict[str, Any], outputs: list[str]):
        self.io, self.inputs, self.outputs = io, inputs, outputs
        self.order = list(outputs)  # output names in the binding's order (onnxruntime's get_outputs follows it)

    def output_buffers(self) -> dict[str, Any]:
        """present name -> its buffer (the past's)."""
        return dict(zip(self.outputs, self.inputs.values()))


class Rows:
    """Rows start..stop (the first dim) of a buffer a runner made: the same memory at `address`, bound where a call
    runs fewer rows than the buffer holds (one slot of a batched KV cache, or its first n). Fed in place of the
    buffer, it describes itself to the input check."""

    def __init__(self, buffer: Any, start: int, stop: int, dtype: str, shape: tuple[int, ...], address: int):
        self.buffer, self.start, self.stop, self.address = buffer, start, stop, address
        self.dtype, self.shape = dtype, (stop - start, *shape[1:])

    def tgedge_meta(self) -> tuple[str, tuple[int, ...]]:
        return self.dtype, self.shape

    @classmethod
    def of(cls, buffer: Any, rows: tuple[int, int], dtype: str, shape: tuple[int, ...], base: int) -> "Rows":
        """Rows (start, stop) of a C-contiguous buffer of `shape` whose memory starts at address `base`."""
        row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        return cls(buffer, *rows, dtype, shape, base + rows[0] * row_bytes)


class BaseRunner:
    """activate / infer(feed) -> outputs / deactivate, usable as a context manager."""

    def __init__(self, name: str):
        self.name = name
        self.is_active = False
        self._input_metadata: dict[str, TensorMeta] | None = None

    # -- the contract ---------------------------------------------------------------------------------------
    def activate(self) -> None:
        if self.is_active:
            raise TgedgeInternalError(f"runner {self.name!r} is already active")
        self.activate_impl()
        self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False
            self._input_metadata = None

    def __enter__(self) -> "BaseRunner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def get_input_metadata(self) -> dict[str, TensorMeta]:
        if self._input_metadata is None:
            self._input_metadata = self.get_input_metadata_impl()
        return self._input_metadata

    def get_output_metadata(self) -> dict[str, TensorMeta]:
        return self.get_output_metadata_impl()

    def infer(self, feed: dict[str, Any], check_inputs: bool = True, **kwargs) -> dict[str, Any]:
        if not self.is_active:
            raise TgedgeInternalError(f"runner {self.name!r} must be activated before infer()")
        if check_inputs:
            check_feed(self.name, feed, self.get_input_metadata(), self.describe_value)
        return self.infer_impl(feed, **kwargs)

    def describe_value(self, value: Any) -> tuple[str, tuple[int, ...]]:
        """(dtype name, shape) of a value this runner accepts; backends with device arrays extend it."""
        return describe_array(value)

    # -- for backends ---------------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        raise NotImplementedError

    def get_input_metadata_impl(self) -> dict[str, TensorMeta]:
        raise NotImplementedError

    def get_output_metadata_impl(self) -> dict[str, TensorMeta]:
        raise NotImplementedError

    def infer_impl(self, feed: dict[str, Any], **kwargs) -> dict[str, Any]:
        raise NotImplementedError
