"""Precisions: each one declared once, with everything the other layers ask of it (torch-free, like contract.py).

A graph's precision is a name in `manifest.json` (`graphs.<stage>.precision`). Export writes the float ones and the
weight-only decoders, quantize writes any of them from an fp32 export, inspect reads which one a graph holds,
validate judges each stage by its precision's policy section, build sets TensorRT 8.6's flags from it; each of them
looks the name up here instead of spelling it.
"""

from __future__ import annotations

from dataclasses import dataclass


# How a graph holds a precision (what quantize writes, what inspect looks for):
FLOAT = "float"  # every float tensor and op in `float_dtype` (fp16 keeps norms, softmax and positions in fp32)
QDQ = "qdq"  # QuantizeLinear / DequantizeLinear around MatMul / Gemm / Conv: calibrated activations and weights
NBITS = "nbits"  # onnxruntime MatMulNBits blocks: weights only, activations stay in `float_dtype`


@dataclass(frozen=True)
class Precision:
    name: str
    rank: int  # 0 is the reference; higher is further from it (validate judges answers by an export's highest)
    form: str  # FLOAT | QDQ | NBITS
    weight_bits: int  # what a weight is stored in (NBITS: MatMulNBits' `bits`)
    # FLOAT: numpy name of the type every float tensor (weights, activations, KV cache) is written in; QDQ and NBITS
    # keep the float type of the graph they quantise (an fp16 export's int4w decoder computes in fp16)
    float_dtype: str | None = None
    stages: tuple[str, ...] | None = None  # what `--precision NAME` alone applies to (None: every graph)
    export_limit: float | None = None  # export's check: output passes at rel L2 <= this (None: export never writes it)
    # fp32: drift is judged in units of the reference's own float64 noise (tgedge.drift): export's check passes an
    # output at rel L2 <= noise_factor x noise, measured on the check's input (export_limit when it cannot be)
    noise_factor: float | None = None
    tensorrt_flags: tuple[str, ...] = ()  # trt.BuilderFlag names where the network is not strongly typed (8.6)

    @property
    def weight_only(self) -> bool:
        return self.form == NBITS

    def applies_to(self, stage: str) -> bool:
        return self.stages is None or stage in self.stages

    def held_by(self, graph: "GraphEvidence") -> bool:
        """Whether a graph's ops and weights show this precision (`tgedge inspect`)."""
        if self.form == QDQ:
            return graph.qdq
        if self.form == NBITS:
            return self.weight_bits in graph.nbits
        return self.float_dtype in graph.float_weights


@dataclass(frozen=True)
class GraphEvidence:
    """What `tgedge inspect` reads from a graph to say which precision it holds."""
    qdq: bool  # compute nodes fed by DequantizeLinear, with QuantizeLinear present (weights and activations)
    nbits: frozenset[int]  # the `bits` of its MatMulNBits nodes
    float_weights: frozenset[str]  # the float dtypes of its initializers and constants


# Highest first. fp32 is judged against its measured noise (tgedge.drift; its export_limit applies only where the noise
# cannot be measured); the reduced precisions' limits are far above any fp32 noise. int8 has no export limit: it needs
# calibration, so only quantize writes it (validate judges it).
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", 0, FLOAT, 32, "float32", export_limit=1e-3, noise_factor=8.0),
    Precision("fp16", 1, FLOAT, 16, "float16", export_limit=2e-2, tensorrt_flags=("FP16",)),
    Precision("int8w", 2, NBITS, 8, stages=("decoder",), export_limit=5e-2),
    Precision("int8", 3, QDQ, 8, tensorrt_flags=("FP16", "INT8")),  # explicit Q/DQ: no calibrator
    Precision("int4w", 4, NBITS, 4, stages=("decoder",), export_limit=0.25),
)}
REFERENCE = PRECISIONS["fp32"]  # what export writes by default, and what quantize and calibration start from
HALF = PRECISIONS["fp16"]  # what onnxruntime's float16 converter makes (quantize, export --dtype)
WEIGHT_ONLY = tuple(p for p in PRECISIONS.values() if p.weight_only)  # export --decoder-weights
EXPORT_DTYPES = tuple(p for p in PRECISIONS.values() if p.form == FLOAT and p.export_limit is not None)  # --dtype


def float_name(dtype: str) -> str:
    """The float precision a numpy/torch dtype name is (float32 -> fp32, float16 -> fp16); else the dtype itself."""
    return next((p.name for p in PRECISIONS.values() if p.form == FLOAT and p.float_dtype == dtype), dtype)


def names(precisions=None) -> list[str]:
    return [p.name for p in (PRECISIONS.values() if precisions is None else precisions)]


def lookup(name: str, among=None) -> Precision | None:
    """The precision called `name`, of `among` (default: all); None when there is none."""
    found = PRECISIONS.get(name)
    return found if found is not None and (among is None or found in among) else None


def recognise(graph: GraphEvidence) -> Precision:
    """The precision a graph holds: the furthest from the reference that its ops and weights show."""
    return next((p for p in reversed(PRECISIONS.values()) if p is not REFERENCE and p.held_by(graph)), REFERENCE)
