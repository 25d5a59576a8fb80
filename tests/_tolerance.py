"""Tolerances for comparing float32 results, derived from rounding-error bounds, not from the
differences one CPU happens to show (imported as ``from _tolerance import ...``).

Two code paths that compute one quantity with the operations in another order (a batched matmul
against a loop over taps, another BLAS kernel or vector width on another CPU, another thread
count) round differently. A tolerance must cover that on every CPU.

Derivation. A sum s = t_1 + ... + t_n evaluated in float32 in any order obeys (Higham, *Accuracy
and Stability of Numerical Algorithms*, 2nd ed., 2002, section 4.2)

    |fl(s) - s| <= gamma_(n-1) * sum_i |t_i|,   gamma_n = n u / (1 - n u),   u = 2^-24 = EPS32 / 2.

That worst case needs every rounding error to push the same way. Modelling the errors as
independent and mean-zero (Higham & Mary, "A new approach to probabilistic rounding error
analysis", SIAM J. Sci. Comput. 41(5), 2019) gives, with probability at least about
1 - 2 n exp(-lambda^2 / 2),

    |fl(s) - s| <= lambda * sqrt(n) * u * sum_i |t_i|   (to first order in u).

Two evaluations each obey it, so they differ by at most twice that: ``float32_bound``. With
lambda = 6 a bound fails with probability below 3e-8 per term summed. ``scale`` must bound
sum |t_i|: the value itself when the terms share a sign (probabilities, squares, losses that are
sums of non-negative parts); under cancellation a larger figure (say why where it is used).

float16 is different: a value rounded to float16 (spacing 2^-10 relative) from float32 inputs
that differ by ~1e-6 relative usually rounds the same, but when the inputs straddle a rounding
midpoint the results differ by one whole float16 spacing, ulp16(x) <= EPS16 * |x|: a jump, not a
drift, and which elements jump depends on the CPU. ``float16_rounding_bound`` bounds it.
"""

from __future__ import annotations

import math

import torch

EPS32 = 2.0**-23  # float32 machine epsilon (spacing of floats at 1); unit roundoff u = EPS32 / 2
EPS16 = 2.0**-10  # float16 machine epsilon
LAMBDA = 6.0  # confidence of the probabilistic bound: failure probability <= 2 exp(-18) ~ 3e-8 per term


def _value(scale: float | torch.Tensor) -> float:
    value = float(scale.detach().abs().max()) if isinstance(scale, torch.Tensor) else abs(float(scale))
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def float32_bound(n_terms: int, scale: float | torch.Tensor, lam: float = LAMBDA) -> float:
    """Largest |a - b| expected between two float32 evaluations, in different orders, of one
    sum of ``n_terms`` terms whose magnitudes sum to at most ``scale`` (a tensor: its max |.|).

    Returns ``lam * sqrt(n_terms) * EPS32 * scale`` = 2 x (lam sqrt(n) u sum|t_i|), u = EPS32 / 2
    (module docstring). E.g. n = 195, scale 1: 1.0e-5; n = 64, scale 1: 5.7e-6.
    """
    if n_terms < 1:
        raise ValueError(f"n_terms must be >= 1, got {n_terms}")
    return lam * math.sqrt(n_terms) * EPS32 * _value(scale)


def float16_rounding_bound(n_rounded: int, scale: float | torch.Tensor) -> float:
    """Largest |a - b| between two sums of ``n_rounded`` values each rounded to float16 from
    float32 values that differ by far less than a float16 spacing and are at most ``scale`` in
    magnitude: one spacing ulp16(x) <= EPS16 * |x| per rounded value (module docstring)."""
    if n_rounded < 1:
        raise ValueError(f"n_rounded must be >= 1, got {n_rounded}")
    return n_rounded * EPS16 * _value(scale)
