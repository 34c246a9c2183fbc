"""int4w / int8w settings: how weight-only blocks are written as onnxruntime MatMulNBits (imports nothing heavy: the
CLI reads its choices, export and quantize write with it)."""

from __future__ import annotations

from dataclasses import dataclass

from tgedge.errors import TgedgeError

BLOCK_SIZE = 32  # MatMulNBits block along K
# MatMulNBits accuracy_level: 0 computes in the activations' dtype; 4 quantises the activations to int8 per block
# (onnxruntime's int8 kernels: VNNI on x86, dot-product on Arm).
ACCURACY_LEVEL = 0  # measured choice: docs/BENCHMARKS.md
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class WeightOnly:
    """How int4w / int8w weights are written as onnxruntime MatMulNBits: bits, block size, accuracy level."""
    bits: int = 4
    block_size: int = BLOCK_SIZE
    accuracy_level: int = ACCURACY_LEVEL

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise TgedgeError(f"weight-only bits {self.bits}: choose 4 or 8")
        if self.block_size not in BLOCK_SIZES:
            raise TgedgeError(f"--block-size {self.block_size}: choose from {', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise TgedgeError(f"--accuracy-level {self.accuracy_level}: choose from "
                              f"{', '.join(map(str, ACCURACY_LEVELS))} (0: fp32 activations, 4: int8)")

    @classmethod
    def of(cls, precision: str, block_size: int | None = None, accuracy_level: int | None = None) -> "WeightOnly":
        """int4w / int8w with the defaults where None."""
        return cls(4 if precision == "int4w" else 8, BLOCK_SIZE if block_size is None else block_size,
                   ACCURACY_LEVEL if accuracy_level is None else accuracy_level)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "accuracy_level": self.accuracy_level}
