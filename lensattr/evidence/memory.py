"""The working-memory estimate of a forward pass, shared by the intervention engine and the
patching sweeps to size their chunks under ``memory_budget``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..models.adapter import Adapter

__all__ = ["position_bytes"]


def position_bytes(a: Adapter, n_pos: int) -> int:
    """Working memory of one (row, position) of a forward over ``n_pos`` positions: residual,
    norms, q/k/v, MLP hidden units, one attention row per head (patterns: the patched-in row
    too) and the edit tensors (an estimate, x2), in the model's dtype."""
    d_mlp = int(getattr(a.cfg, "d_mlp", None) or 4 * a.d_model)
    floats = 4 * a.d_model + 3 * d_mlp + 3 * a.n_heads * n_pos + 4 * a.n_heads * a.d_head
    return 2 * floats * torch.finfo(a.dtype).bits // 8
