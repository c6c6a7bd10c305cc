"""The claimed source set of a head at a query.

C(q) = the fewest non-sink sources whose attention adds up to at least ``coverage`` (0.5) of the
row; sink/BOS mass is excluded and reported apart. When all non-sink sources together carry less
than ``coverage``, the row claims the sink: C(q) = {sink}.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["claimed_sets"]


def claimed_sets(
    patterns: Float[Tensor, "batch layer head_index query_pos key_pos"],
    sink: Bool[Tensor, "batch key_pos"],
    allowed: Bool[Tensor, "batch query_pos key_pos"],
    coverage: float = 0.5,
) -> Bool[Tensor, "batch layer head_index query_pos key_pos"]:
    P = patterns.float() * allowed[:, None, None].float()
    sink_b = sink[:, None, None, None, :].expand_as(P)  # sink: [batch, key_pos] bool
    ranked = P.masked_fill(sink_b, -1.0)  # sinks sort last
    vals, order = ranked.sort(-1, descending=True)
    vals = vals.clamp(min=0)
    before = vals.cumsum(-1) - vals  # mass of strictly higher-ranked sources
    take_sorted = before < coverage - 1e-9
    non_sink_total = vals.sum(-1, keepdim=True)
    take_sorted &= vals > 0
    claimed = torch.zeros_like(take_sorted).scatter(-1, order, take_sorted)
    claimed &= ~sink_b
    sink_claim = non_sink_total < coverage  # [batch, L, H, q, 1]
    claimed = torch.where(sink_claim, sink_b, claimed)
    return claimed & allowed[:, None, None]
