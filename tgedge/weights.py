"""A checkpoint's tensors, read one at a time: what lets a 7 B checkpoint load and export in bounded memory.

`LazyWeights` maps tensor names to where they lie (a safetensors file, through its memory map) and reads a tensor
only when asked, as float32 where it is floating point (or in the dtype asked for). Renaming and filtering make
new mappings without reading anything; nothing is cached, so a loop over every tensor holds one at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Callable

import torch

from tgedge.errors import TgedgeError
from tgedge.fileio import regular_file


# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, the format's header)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _safetensors_index(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, absolute start, end) from a safetensors file's header."""
    regular_file(path, "safetensors file")  # a FIFO would block the read below
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100 << 20:
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
    except FileNotFoundError:
        raise TgedgeError(f"{path}: shard named in the index is missing") from None
    except (OSError, ValueError) as e:
        raise TgedgeError(f"{path}: unreadable safetensors file ({e})") from None
    base, out = 8 + size, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            start, end = (base + int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise TgedgeError(f"{path}: tensor {name!r} has an unsupported or malformed header entry ({info})") from None
        out[name] = (dtype, shape, start, end)
    return out


def _read(path: Path, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int) -> torch.Tensor:
    buf = bytearray(end - start)
    with open(path, "rb") as f:
        f.seek(start)
        if f.readinto(buf) != len(buf):
            raise TgedgeError(f"{path}: truncated safetensors file")
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


class LazyWeights(Mapping):
    def __init__(self, sources: dict[str, Callable[[], torch.Tensor]], shapes: dict[str, tuple[int, ...]] | None = None):
        self._sources = sources  # name -> a function reading that tensor as stored
        self._shapes = shapes or {}

    # -- building ---------------------------------------------------------------------------------------------
    @classmethod
    def from_safetensors(cls, files: list[Path]) -> "LazyWeights":
        """Each tensor read from its file's byte range when asked (a plain read, not a memory map: only the tensor
        being read is in memory, and a scan of every tensor leaves nothing resident)."""
        sources, shapes = {}, {}
        for path in files:
            for key, (dtype, shape, start, end) in _safetensors_index(path).items():
                sources[key] = (lambda p=path, d=dtype, s=shape, a=start, b=end: _read(p, d, s, a, b))
                shapes[key] = shape
        return cls(sources, shapes)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LazyWeights":
        """Tensors already in memory (a pickled .bin checkpoint, a test)."""
        return cls({k: (lambda v=v: v) for k, v in tensors.items()}, {k: tuple(v.shape) for k, v in tensors.items()})

    def renamed(self, names: dict[str, str]) -> "LazyWeights":
        return LazyWeights({names.get(k, k): f for k, f in self._sources.items()},
                           {names.get(k, k): s for k, s in self._shapes.items()})

    def only(self, keep: Callable[[str], bool]) -> "LazyWeights":
        return LazyWeights({k: f for k, f in self._sources.items() if keep(k)},
                           {k: s for k, s in self._shapes.items() if keep(k)})

    def merged(self, other: "LazyWeights") -> "LazyWeights":
        return LazyWeights({**self._sources, **other._sources}, {**self._shapes, **other._shapes})

    # -- reading ----------------------------------------------------------------------------------------------
    def raw(self, name: str) -> torch.Tensor:
        """The tensor as the file stores it (e.g. bf16)."""
        return self._sources[name]()

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.raw(name)
        return t.float() if t.is_floating_point() else t

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name] if name in self._shapes else tuple(self.raw(name).shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def __contains__(self, name) -> bool:
        return name in self._sources
