"""Compensation partners: searched among candidates, not all pairs.

A candidate partner of head h is a head whose output at the read position changes when h is
ablated, or whose ablation changes h's output (backup heads respond to the absence of the head
they back up). The change is measured in the same batched forward as the solo ablations
(``EngineResult.head_delta``) and scaled by the largest mean clean head-output norm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..types import HeadId

__all__ = ["candidate_partners", "CANDIDATE_MIN", "MAX_CANDIDATES"]

CANDIDATE_MIN = 0.1  # scaled output change that makes a head a candidate partner
MAX_CANDIDATES = 3


def candidate_partners(
    head_delta: Tensor,
    clean_norm: Tensor,
    heads: list[HeadId],
    min_change: float = CANDIDATE_MIN,
    k: int = MAX_CANDIDATES,
) -> dict[HeadId, list[HeadId]]:
    """``head_delta``: [ablated head, batch, layer, head_index] from the solo ablations, in the
    order of ``heads``; ``clean_norm``: [layer, head_index] mean clean output norm."""
    n_heads = clean_norm.shape[1]
    scale = clean_norm.max().clamp(min=1e-9)
    change = head_delta.mean(1).flatten(1) / scale  # [ablated, affected]
    flat = [h.layer * n_heads + h.head for h in heads]
    change = change[:, flat]  # both axes in the order of ``heads``
    sym = torch.maximum(change, change.T)
    sym.fill_diagonal_(0.0)
    out: dict[HeadId, list[HeadId]] = {}
    for i, h in enumerate(heads):
        vals, order = sym[i].sort(descending=True)
        out[h] = [
            heads[j]
            for v, j in zip(vals.tolist()[:k], order.tolist()[:k], strict=True)
            if v >= min_change
        ]
    return out
