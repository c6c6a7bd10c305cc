"""Standard sweeps over every head: ablations, claimed-set edits, direct paths, single edges."""

from __future__ import annotations

import torch
from torch import Tensor

from ..types import AblationMethod, HeadId
from .interventions import Intervention, ablate, remove_direct, remove_sources

__all__ = ["ablation_sweep", "claim_sweep", "edge_sweep", "joint_sweep", "label"]


def label(kind: str, *heads: HeadId, extra: str = "") -> str:
    return f"{kind}:" + "+".join(f"{h.layer}.{h.head}" for h in heads) + extra


def ablation_sweep(heads: list[HeadId], method: AblationMethod) -> list[Intervention]:
    return [ablate(h, method=method, label=label(method.value, h)) for h in heads]


def claim_sweep(
    heads: list[HeadId], claimed: Tensor, rows: Tensor, direct: bool
) -> list[Intervention]:
    """Per head: keep only the claimed set, remove it, remove it and renormalise, and (when
    ``direct``) remove the head's direct path. ``claimed``: [batch, layer, head, q, k] bool;
    ``rows``: [batch, q, k] bool, the allowed (query, key) pairs."""
    out = []
    for h in heads:
        c = claimed[:, h.layer, h.head] & rows  # [batch, q, k]
        out.append(remove_sources(h, rows & ~c, label=label("keep", h)))
        out.append(remove_sources(h, c, label=label("remove", h)))
        out.append(remove_sources(h, c, renormalise=True, label=label("renorm", h)))
        if direct:
            out.append(remove_direct(h, label=label("direct", h)))
    return out


def edge_sweep(
    heads: list[HeadId], read_pos: Tensor, sources: list[Tensor], n_pos: int
) -> list[Intervention]:
    """Per head and examined source: remove the single edge (read position -> source).
    ``sources``: one [batch] tensor of source positions per examined source (−1 = absent)."""
    n = read_pos.shape[0]
    rows = torch.arange(n)
    out = []
    for j, src in enumerate(sources):
        mask = torch.zeros(n, n_pos, n_pos, dtype=torch.bool)
        ok = src >= 0
        mask[rows[ok], read_pos[ok], src[ok]] = True
        for h in heads:
            out.append(remove_sources(h, mask, label=label("edge", h, extra=f"@{j}")))
    return out


def joint_sweep(pairs: list[tuple[HeadId, HeadId]], method: AblationMethod) -> list[Intervention]:
    return [
        ablate(a, b, method=method, label=label("joint-" + method.value, a, b)) for a, b in pairs
    ]
