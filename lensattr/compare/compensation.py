"""Compensation: candidate partners, the best partner, and direct versus total effect.

Partners are searched among candidates, not all pairs. A candidate partner of head h is

* a head whose output at the read position changes when h is ablated, or whose ablation
  changes h's output (a backup responds to the absence of the head it backs up), measured in
  the batched forward of the solo ablations under the same baseline
  (``EngineResult.head_delta``), scaled by the largest mean clean head-output norm; or
* a head that writes the same thing: its clean output at the read position has cosine
  similarity >= ``SIMILAR_MIN`` with h's (redundant writers, which includes heads of the same
  layer: they cannot respond to each other, but the readout can saturate on either).

Among the candidates whose joint ablation was run, the partner is the one with the largest
significant interaction (see :mod:`lensattr.compare.verdicts`).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.types import HeadId
from ..stats.inference import Estimate
from .verdicts import Compensation, Thresholds

__all__ = [
    "candidate_partners",
    "best_partner",
    "CANDIDATE_MIN",
    "SIMILAR_MIN",
    "MAX_CANDIDATES",
]

CANDIDATE_MIN = 0.1  # scaled output change that makes a head a candidate partner
SIMILAR_MIN = 0.5  # cosine of clean outputs that makes a head a candidate partner
MAX_CANDIDATES = 3  # per criterion


def candidate_partners(
    head_delta: Float[Tensor, "ablated layer head_index"],
    out_clean: Float[Tensor, "batch layer head_index d_model"],
    heads: list[HeadId],
    min_change: float = CANDIDATE_MIN,
    min_cosine: float = SIMILAR_MIN,
    k: int = MAX_CANDIDATES,
) -> dict[HeadId, list[HeadId]]:
    """``head_delta`` from the solo ablations (averaged over prompts), in the order of
    ``heads``; ``out_clean`` each head's clean output at the read position. Returns up to
    ``k`` candidates per criterion."""
    n_heads = out_clean.shape[2]
    norm = out_clean.norm(dim=-1).mean(0)  # [layer, head]
    scale = norm.max().clamp(min=1e-9)
    flat = [h.layer * n_heads + h.head for h in heads]
    change = (head_delta.flatten(1) / scale)[:, flat]  # [ablated, affected]
    responds = torch.maximum(change, change.T)
    o = out_clean.flatten(1, 2)[:, flat]  # [batch, head, d_model]
    o = o / o.norm(dim=-1, keepdim=True).clamp(min=1e-9)
    cos = torch.einsum("bid,bjd->ij", o, o) / o.shape[0]  # mean cosine over prompts
    quiet = norm.flatten()[flat] < 1e-6 * scale  # heads that write nothing have no direction
    cos[quiet] = 0.0
    cos[:, quiet] = 0.0
    out: dict[HeadId, list[HeadId]] = {}
    for i, h in enumerate(heads):
        picked: list[HeadId] = []
        for score, lo in ((responds[i], min_change), (cos[i], min_cosine)):
            s = score.clone()
            s[i] = -math.inf
            vals, order = s.sort(descending=True)
            for v, j in zip(vals.tolist()[:k], order.tolist()[:k], strict=True):
                if v >= lo and heads[j] not in picked:
                    picked.append(heads[j])
        out[h] = picked
    return out


def best_partner(
    h: HeadId,
    tested: dict[HeadId, tuple[Estimate, Estimate, float]],
    th: Thresholds,
) -> tuple[HeadId | None, Estimate | None, Estimate | None, float]:
    """``tested``: partner -> (joint effect, interaction, q of the interaction). The partner is
    the candidate with the largest significant interaction in the joint effect's direction; when
    none is significant, the one with the largest interaction (reported, not a verdict)."""
    best, best_key = None, None
    for c, (joint, inter, q) in tested.items():
        if not math.isfinite(inter.value) or not math.isfinite(joint.value):
            continue
        s = 1.0 if joint.value >= 0 else -1.0
        key = (q < th.alpha, s * inter.value)
        if best_key is None or key > best_key:
            best, best_key = c, key
    if best is None:
        return None, None, None, math.nan
    joint, inter, q = tested[best]
    return best, joint, inter, q


def compensation(
    h: HeadId,
    tested: dict[HeadId, tuple[Estimate, Estimate, float]],
    dmt: Estimate | None,
    q_dmt: float,
    th: Thresholds,
) -> Compensation:
    partner, joint, inter, q = best_partner(h, tested, th)
    return Compensation(partner, joint, inter, q, dmt, q_dmt)
