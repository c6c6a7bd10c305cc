"""How closely two exact computations of one number agree, by the dtype they run in.

In float32 (and float64) two exact ways of computing one forward (the hook-free engine and the
bridge) agree within :data:`FLOAT32_TOL`. In half precision (bfloat16, float16) they differ by a
few units in the last place of the values computed: :func:`half_rounding` is
:data:`HALF_ULPS` times the dtype's epsilon, relative to the scale of the values. The checks of
the hook-free forwards and the audit's effect noise floor both use it, so an effect the check
lets through as rounding is also ranked as rounding.
"""

from __future__ import annotations

import torch

__all__ = ["FLOAT32_TOL", "HALF_ULPS", "half_rounding"]

FLOAT32_TOL = 1e-4  # a hook-free forward is used only where it reproduces the bridge this closely
HALF_ULPS = 8  # units in the last place two exact half-precision forwards may differ by


def half_rounding(dtype: torch.dtype | None) -> float | None:
    """Relative rounding of a half-precision forward (``HALF_ULPS`` x epsilon); None for
    float32, float64 or an unknown dtype."""
    if dtype is None or not dtype.is_floating_point:
        return None
    eps = torch.finfo(dtype).eps
    return None if eps <= torch.finfo(torch.float32).eps else HALF_ULPS * eps
