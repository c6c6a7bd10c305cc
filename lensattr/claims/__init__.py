"""What attention claims, read from one cached clean run."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..core.prompts import PromptSet
from .circuits import CompositionScores, composition_scores, copying_scores, head_circuits
from .claimed_sets import claimed_sets
from .flow import Flow, FlowBudgetError, attention_flow, flow
from .head_types import (
    STRIKING,
    TYPE_NAMES,
    allowed_keys,
    entropy,
    label_types,
    sink_mask,
    type_scores,
)
from .norms import NormAttention, norm_attention
from .rollout import Rollout, attention_rollout, mix_residual, rollout

__all__ = [
    "Claims",
    "compute_claims",
    "claimed_sets",
    "type_scores",
    "TYPE_NAMES",
    "STRIKING",
    "DIFFUSE",
    # value-aware and multi-layer claims (issue 9, parts 4-5)
    "NormAttention",
    "norm_attention",
    "Rollout",
    "rollout",
    "attention_rollout",
    "mix_residual",
    "Flow",
    "FlowBudgetError",
    "flow",
    "attention_flow",
    "head_circuits",
    "CompositionScores",
    "composition_scores",
    "copying_scores",
]

DIFFUSE = 0.8  # normalised entropy at the read position at or above which a head is "diffuse"


@dataclass
class Claims:
    """Claims per head. Axes: batch (prompt), layer, head_index, query_pos, key_pos.

    "At the read position" means over the metric's read rows (``read_rows``; one position per
    prompt for a logit metric, every real token for a mean-pooled one), averaged over them;
    ``read_pos`` is the last read row of each prompt, where per-row claims are shown.
    """

    patterns: Float[Tensor, "batch layer head_index query_pos key_pos"]
    scores: dict[str, Float[Tensor, "layer head_index"]]
    head_type: list[list[str]]
    claim_score: Float[Tensor, "layer head_index"]
    scores_read: dict[str, Float[Tensor, "layer head_index"]]  # type scores at the read rows
    head_type_read: list[list[str]]
    claim_score_read: Float[Tensor, "layer head_index"]
    entropy_read: Float[Tensor, "layer head_index"]  # mean normalised entropy at read rows
    sink_mass_read: Float[Tensor, "layer head_index"]  # mean sink/BOS mass at read rows
    top_source: Int[Tensor, "batch layer head_index"]  # argmax source at ``read_pos``
    top_mass: Float[Tensor, "batch layer head_index"]
    claimed: Bool[Tensor, "batch layer head_index query_pos key_pos"]
    allowed: Bool[Tensor, "batch query_pos key_pos"]
    sink: Bool[Tensor, "batch pos"]
    read_pos: Int[Tensor, " batch"]
    read_rows: Bool[Tensor, "batch pos"]

    @property
    def diffuse(self) -> Bool[Tensor, "layer head_index"]:
        return self.entropy_read >= DIFFUSE

    @property
    def striking(self) -> Bool[Tensor, "layer head_index"]:
        """A striking pattern over every query or at the read rows."""
        best = torch.fmax(self.claim_score, self.claim_score_read)
        return torch.nan_to_num(best, nan=0.0) >= STRIKING


def compute_claims(
    patterns: list[Tensor],
    prompts: PromptSet,
    read_rows: Tensor,
    causal: bool = True,
    coverage: float = 0.5,
) -> Claims:
    """``patterns``: one ``[batch, head_index, query_pos, key_pos]`` tensor per layer;
    ``read_rows``: ``[batch, pos]`` bool (or ``[batch]`` positions) the metric reads."""
    P = torch.stack([p.float().cpu() for p in patterns], 1)  # [batch, layer, head, q, k]
    n, p = prompts.tokens.shape
    read_rows = torch.as_tensor(read_rows).cpu()
    if read_rows.dtype != torch.bool:  # one position per prompt
        pos = read_rows.long()
        read_rows = torch.zeros(n, p, dtype=torch.bool)
        read_rows[torch.arange(n), pos] = True
    read_rows = read_rows & prompts.valid
    read_pos = torch.where(read_rows, torch.arange(p), -1).max(1).values  # last read row
    allowed = allowed_keys(prompts, causal)
    sink = sink_mask(prompts)
    scores = type_scores(P, prompts)
    labels, best = label_types(scores)
    scores_r = type_scores(P, prompts, read_rows)
    labels_r, best_r = label_types(scores_r)
    w = read_rows.float()[:, None, None, :]  # [batch, 1, 1, q]
    w = w / w.sum(-1, keepdim=True).clamp(min=1)
    ent = entropy(P, allowed)  # [batch, layer, head, q]
    ent_read = (torch.nan_to_num(ent) * w).sum(-1) / (w * torch.isfinite(ent)).sum(-1)
    sink_q = (P * sink[:, None, None, None, :].float()).sum(-1)  # [batch, layer, head, q]
    rows = torch.arange(n)
    top = P[rows, :, :, read_pos].max(-1)  # at the last read row
    return Claims(
        patterns=P,
        scores=scores,
        head_type=labels,
        claim_score=best,
        scores_read=scores_r,
        head_type_read=labels_r,
        claim_score_read=best_r,
        entropy_read=ent_read.nanmean(0),
        sink_mass_read=(sink_q * w).sum(-1).mean(0),
        top_source=top.indices,
        top_mass=top.values,
        claimed=claimed_sets(P, sink, allowed, coverage),
        allowed=allowed,
        sink=sink,
        read_pos=read_pos,
        read_rows=read_rows,
    )
