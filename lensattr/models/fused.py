"""Fused equivalents of activation modules written as chains of Python tensor operations.

HF's ``NewGELUActivation`` (GPT-2's ``gelu_new``) and ``FastGELUActivation`` compute the tanh
approximation of GELU in eight element-wise operations, each a pass over the MLP's hidden
activations, forward and again backward. ``torch.nn.functional.gelu(x, approximate="tanh")``
is the same function in one kernel (max difference 2.4e-7 on N(0, 1) inputs in float32: rounding).
The hook-free forwards (:mod:`lensattr.evidence.bare`, :mod:`lensattr.evidence.grad_forward`)
run a copy of the HF MLP with such an activation swapped for the fused one; the model itself is
not touched, and those forwards are used only after they reproduce the bridge's readout.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TanhGELU", "fused_mlp"]


class TanhGELU(nn.Module):
    """GELU, tanh approximation, one fused kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")


def _slow_tanh_gelus() -> tuple[type, ...]:
    try:
        from transformers import activations
    except ImportError:  # pragma: no cover - transformers comes with TransformerLens
        return ()
    return tuple(getattr(activations, n) for n in ("NewGELUActivation", "FastGELUActivation")
                 if hasattr(activations, n))


def fused_mlp(mlp: nn.Module) -> nn.Module:
    """``mlp`` itself, or a shallow copy whose direct children that compute the tanh GELU in
    Python are replaced by :class:`TanhGELU` (weights shared, ``mlp`` unchanged)."""
    slow = _slow_tanh_gelus()
    swaps = {n: TanhGELU() for n, c in mlp.named_children() if slow and isinstance(c, slow)}
    if not swaps:
        return mlp
    fast = copy.copy(mlp)
    fast._modules = {**mlp._modules, **swaps}
    return fast
