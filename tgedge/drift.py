"""One definition of fp32 drift, shared by export's check and validate's defaults (torch-free).

A correct fp32 export differs from the fp32 reference by rounding alone: another accumulation order, another
kernel. How large that rounding is depends on the model (depth, width, activation scale: ~3e-7 on the 2-layer demo,
~3e-5 on a 24-layer 0.5 B decoder with realistic weights), so a fixed limit either fails correct exports of real
models or lets real defects through on small ones. The unit is therefore measured on the model at hand: the
reference's own **noise**, `rel_l2(reference fp32, reference float64)` of a stage's output on one input
(`tgedge.noise` computes the float64 side without a second copy of the model). Drift is `rel_l2(export, reference
fp32)`; an fp32 stage passes at `drift <= factor x max(noise, NOISE_FLOOR)`, the factor being fp32's
`noise_factor` in the precision table (export) and `max_noise_ratio` in the policy (validate: the default policy has
the same number; tests check). Measured drift / noise (scripts/noise_floor.py, docs/CI.md): 0.55-1.18 on the demo,
1.2-1.4 on the 0.5 B presets; a 5 % error in an eighth of one decoder MLP weight is thousands of times the noise.
"""

from __future__ import annotations

import numpy as np

# Below this the noise is a few fp32 ulps (a stage nearly exact in fp32): a drift of another kernel's rounding must not
# read as many "noises" (fp32's epsilon is 1.2e-7).
NOISE_FLOOR = 1e-6


def rel_l2(got, want) -> float:
    """||got - want|| / ||want|| in float64 (||got - want|| when `want` is all zero)."""
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    if got.shape != want.shape:
        return float("inf")
    norm = float(np.linalg.norm(want))
    diff = float(np.linalg.norm(got - want))
    return diff / norm if norm else diff


def noise_ratio(drift: float, noise: float) -> float:
    """Drift in units of the reference's own noise (floored at NOISE_FLOOR)."""
    return drift / max(noise, NOISE_FLOOR)


def noise_limit(noise: float, factor: float) -> float:
    """The largest rel L2 drift an fp32 output may have: `factor` noises."""
    return factor * max(noise, NOISE_FLOOR)
