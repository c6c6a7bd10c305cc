"""What attention claims, read from one cached clean run."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..prompts import PromptSet
from .claimed_sets import claimed_sets
from .head_types import (
    STRIKING,
    TYPE_NAMES,
    allowed_keys,
    entropy,
    label_types,
    sink_mask,
    type_scores,
)

__all__ = [
    "Claims",
    "compute_claims",
    "claimed_sets",
    "type_scores",
    "TYPE_NAMES",
    "STRIKING",
    "DIFFUSE",
]

DIFFUSE = 0.8  # normalised entropy at the read position at or above which a head is "diffuse"


@dataclass
class Claims:
    """Claims per head. Axes: batch (prompt), layer, head_index, query_pos, key_pos."""

    patterns: Float[Tensor, "batch layer head_index query_pos key_pos"]
    scores: dict[str, Float[Tensor, "layer head_index"]]
    head_type: list[list[str]]
    claim_score: Float[Tensor, "layer head_index"]
    entropy_read: Float[Tensor, "layer head_index"]  # mean normalised entropy at read position
    sink_mass_read: Float[Tensor, "layer head_index"]  # mean sink/BOS mass at read position
    top_source: Int[Tensor, "batch layer head_index"]  # argmax source at the read position
    top_mass: Float[Tensor, "batch layer head_index"]
    claimed: Bool[Tensor, "batch layer head_index query_pos key_pos"]
    allowed: Bool[Tensor, "batch query_pos key_pos"]
    sink: Bool[Tensor, "batch pos"]
    read_pos: Int[Tensor, " batch"]

    @property
    def diffuse(self) -> Bool[Tensor, "layer head_index"]:
        return self.entropy_read >= DIFFUSE


def compute_claims(
    patterns: list[Tensor],
    prompts: PromptSet,
    read_pos: Tensor,
    causal: bool = True,
    coverage: float = 0.5,
) -> Claims:
    """``patterns``: one ``[batch, head_index, query_pos, key_pos]`` tensor per layer."""
    P = torch.stack([p.float().cpu() for p in patterns], 1)  # [batch, layer, head, q, k]
    allowed = allowed_keys(prompts, causal)
    sink = sink_mask(prompts)
    scores = type_scores(P, prompts)
    labels, best = label_types(scores)
    n = P.shape[0]
    rows = torch.arange(n)
    at_read = P[rows, :, :, read_pos]  # [batch, layer, head, k]
    ent = entropy(P, allowed)[rows, :, :, read_pos]  # [batch, layer, head]
    top = at_read.max(-1)
    sink_mass = (at_read * sink[:, None, None, :].float()).sum(-1)  # [batch, layer, head]
    return Claims(
        patterns=P,
        scores=scores,
        head_type=labels,
        claim_score=best,
        entropy_read=ent.nanmean(0),
        sink_mass_read=sink_mass.mean(0),
        top_source=top.indices,
        top_mass=top.values,
        claimed=claimed_sets(P, sink, allowed, coverage),
        allowed=allowed,
        sink=sink,
        read_pos=read_pos,
    )
