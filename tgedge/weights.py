"""A checkpoint's tensors, read one at a time: what lets a 7 B checkpoint load and export in bounded memory.

`LazyWeights` maps tensor names to where they lie (a safetensors file, through its memory map) and reads a tensor
only when asked, as float32 where it is floating point (or in the dtype asked for). Renaming and filtering make
new mappings without reading anything; nothing is cached, so a loop over every tensor holds one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Callable

import torch

from tgedge.errors import TgedgeError


class LazyWeights(Mapping):
    def __init__(self, sources: dict[str, Callable[[], torch.Tensor]], shapes: dict[str, tuple[int, ...]] | None = None):
        self._sources = sources  # name -> a function reading that tensor as stored
        self._shapes = shapes or {}

    # -- building ---------------------------------------------------------------------------------------------
    @classmethod
    def from_safetensors(cls, files: list[Path]) -> "LazyWeights":
        from safetensors import safe_open

        sources, shapes = {}, {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except FileNotFoundError:
                raise TgedgeError(f"{path}: shard named in the index is missing") from None
            except Exception as e:
                raise TgedgeError(f"{path}: unreadable safetensors file ({e})") from None
            for key in handle.keys():
                sources[key] = (lambda h=handle, k=key: h.get_tensor(k))
                shapes[key] = tuple(handle.get_slice(key).get_shape())
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
