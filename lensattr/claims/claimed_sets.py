"""The claimed source set of a head at a query.

C(q) = the fewest non-sink sources whose attention adds up to at least ``coverage`` (0.5) of the
row's *non-sink* mass. Sink/BOS mass is excluded and reported apart: a row
[BOS 0.60, S1 0.35, x 0.05] claims S1, not BOS, and "keep only C" leaves the sink's terms
alone. A row with no non-sink mass (e.g. the first query of a causal model, which can only see
BOS) claims nothing and is not edited.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["claimed_sets"]

_CHUNK = 1 << 22  # pattern elements per step (the sort makes ~8 temporaries of that size)


def claimed_sets(
    patterns: Float[Tensor, "batch layer head_index query_pos key_pos"],
    sink: Bool[Tensor, "batch key_pos"],
    allowed: Bool[Tensor, "batch query_pos key_pos"],
    coverage: float = 0.5,
    min_mass: float = 1e-6,
) -> Bool[Tensor, "batch layer head_index query_pos key_pos"]:
    """Per prompt and independent of the others: computed ``_CHUNK`` elements of patterns at a
    time, so the sort's temporaries stay bounded (the result is a bool copy of the shape)."""
    b = patterns.shape[0]
    step = max(1, _CHUNK // max(1, patterns[0].numel()))
    if b > step:
        return torch.cat([claimed_sets(patterns[i:i + step], sink[i:i + step],
                                       allowed[i:i + step], coverage, min_mass)
                          for i in range(0, b, step)])
    P = patterns.float().clamp(min=0) * allowed[:, None, None].float()
    sink_b = sink[:, None, None, None, :].expand_as(P)  # sink: [batch, key_pos] bool
    ranked = P.masked_fill(sink_b, 0.0)  # non-sink mass only
    total = ranked.sum(-1, keepdim=True)  # [batch, L, H, q, 1]
    vals, order = ranked.sort(-1, descending=True)
    before = vals.cumsum(-1) - vals  # mass of strictly higher-ranked sources
    take_sorted = (before < coverage * total - 1e-9) & (vals > 0)
    claimed = torch.zeros_like(take_sorted).scatter(-1, order, take_sorted)
    claimed &= ~sink_b & (total > min_mass)
    return claimed & allowed[:, None, None]
