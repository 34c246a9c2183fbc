"""int4w / int8w settings: how weight-only blocks are written as onnxruntime MatMulNBits (imports nothing heavy: the
CLI reads its choices, export and quantize write with it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tgedge.errors import TgedgeError
from tgedge.precision import WEIGHT_ONLY, Precision, names

BLOCK_SIZE = 32  # MatMulNBits block along K
# MatMulNBits accuracy_level: 0 computes in the activations' dtype; 4 quantises the activations to int8 per block
# (onnxruntime's int8 kernels: VNNI on x86, dot-product on Arm).
ACCURACY_LEVEL = 4  # measured on CPU: docs/BENCHMARKS.md (same error as 0, decode 1.4x)
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class WeightOnly:
    """How int4w / int8w weights are written as onnxruntime MatMulNBits: the precision (its weight bits), block size,
    accuracy level."""
    precision: Precision
    block_size: int = BLOCK_SIZE
    accuracy_level: int = ACCURACY_LEVEL
    lm_head: bool = True  # the LM head's table as blocks too (decode reads all of it every step)

    def __post_init__(self):
        if not self.precision.weight_only:
            raise TgedgeError(f"{self.precision.name} is not a weight-only precision: choose from "
                              f"{', '.join(names(WEIGHT_ONLY))}")
        if self.block_size not in BLOCK_SIZES:
            raise TgedgeError(f"--block-size {self.block_size}: choose from {', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise TgedgeError(f"--accuracy-level {self.accuracy_level}: choose from "
                              f"{', '.join(map(str, ACCURACY_LEVELS))} (0: fp32 activations, 4: int8)")

    @property
    def bits(self) -> int:
        return self.precision.weight_bits

    @classmethod
    def of(cls, precision: Precision, block_size: int | None = None, accuracy_level: int | None = None,
           lm_head: bool | None = None) -> "WeightOnly":
        """int4w / int8w with the defaults where None."""
        return cls(precision, BLOCK_SIZE if block_size is None else block_size,
                   ACCURACY_LEVEL if accuracy_level is None else accuracy_level,
                   cls.lm_head if lm_head is None else lm_head)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "accuracy_level": self.accuracy_level,
                "lm_head": self.lm_head}


def nbits_blocks(wt: np.ndarray, q: WeightOnly) -> tuple[np.ndarray, np.ndarray]:
    """A weight as MatMulNBits reads it, from its (K, N) fp32 form (x @ W^T's right-hand side): packed blocks
    (N, K / block, block * bits / 8) uint8 and scales (N, K / block), symmetric, by onnxruntime's own kernel (what
    its MatMulNBitsQuantizer calls: byte-identical)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    wt = np.ascontiguousarray(wt, np.float32)
    k, n = wt.shape
    blocks = (k + q.block_size - 1) // q.block_size
    packed = np.zeros((n, blocks, q.block_size * q.bits // 8), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, (blocks + 1) // 2 if q.bits == 4 else blocks), np.uint8)
    (quantize_matmul_4bits if q.bits == 4 else quantize_matmul_8bits)(packed, wt, scales, zero_points, q.block_size,
                                                                     n, k, True)
    return packed, scales


def nbits_attributes(q: WeightOnly, k: int, n: int) -> dict:
    """A MatMulNBits node's domain and attributes for a (K, N) weight, as onnxruntime's MatMulNBitsQuantizer writes
    them (`accuracy_level` only when not 0): what `tgedge quantize` and `tgedge export --decoder-weights` both write."""
    level = {"accuracy_level": q.accuracy_level} if q.accuracy_level else {}
    return {"domain": "com.microsoft", "K": k, "N": n, "bits": q.bits, "block_size": q.block_size, **level}
