"""Claim sources beside raw attention, and which one agrees best with the causal evidence.

``audit(..., claims=[...])`` chooses them (``CLAIM_SOURCES``):

* ``raw``: the attention pattern (always computed: the verdicts' claimed sets rest on it);
* ``norm``: norm-based attention ``||alpha[q, s] f(x_s)||`` (Kobayashi et al. 2020), per head;
* ``rollout``: attention rollout (Abnar & Zuidema 2020; head-averaged attention mixed with the
  residual as ``0.5 I + 0.5 A``, rows renormalised), token to token over layers;
* ``flow``: exact attention flow over the same layered graph (igraph max-flow).

Rollout and flow are layer-level, not per head: for an edge (layer l, head h, query q,
source s) the audit uses the value *up to and including layer l* for (q, s), i.e. how much
position q's state after layer l draws on input token s. Every head of a layer therefore
shares that layer's rollout/flow claim; they still rank that layer's edges, whose effects
differ by head. Flow is solved only at the metric's read rows (one max-flow per read row,
source and layer: ``L`` truncated graphs).

Default: raw, norm and rollout, plus flow when the model has at most ``FLOW_MAX_LAYERS``
layers and python-igraph is installed (flow costs ``L`` x read rows x positions max-flow
solves per prompt; on deep models ask for it explicitly).
"""

from __future__ import annotations

import importlib.util
import math

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.prompts import PromptSet
from ..stats.agreement import floor_effects, spearman
from . import Claims
from .flow import attention_flow
from .rollout import attention_rollout, mix_residual

__all__ = ["CLAIM_SOURCES", "COLUMN", "FLOW_MAX_LAYERS", "resolve_claims", "layer_claims",
           "head_claim_columns", "at_rows", "MissingExtraError"]

CLAIM_SOURCES = ("raw", "norm", "rollout", "flow")
# the name each claim source goes by in the edges table and in the agreement table
COLUMN = {"raw": "attention", "norm": "norm_attention", "rollout": "rollout", "flow": "flow"}
FLOW_MAX_LAYERS = 12


class MissingExtraError(ImportError, ValueError):
    """A requested claim source needs an optional dependency that is not installed."""


def resolve_claims(claims, n_layers: int) -> tuple[str, ...]:
    """The claim sources to compute, in ``CLAIM_SOURCES`` order; ``raw`` is always among them.
    ``None`` gives the default (see the module docstring)."""
    if claims is None:
        chosen = {"raw", "norm", "rollout"}
        if n_layers <= FLOW_MAX_LAYERS and importlib.util.find_spec("igraph") is not None:
            chosen.add("flow")
    else:
        if isinstance(claims, (str, bytes)):
            claims = [c.strip() for c in str(claims).split(",") if c.strip()]
        try:
            chosen = set(claims)
        except TypeError:
            raise ValueError(f"claims: expected a list of claim sources from {CLAIM_SOURCES}, "
                             f"got {type(claims).__name__}") from None
        bad = sorted(str(c) for c in chosen if c not in CLAIM_SOURCES)
        if bad:
            raise ValueError(f"claims: unknown claim source(s) {bad}; expected some of "
                             f"{list(CLAIM_SOURCES)}")
        chosen.add("raw")
        if "flow" in chosen and importlib.util.find_spec("igraph") is None:
            raise MissingExtraError(
                'claims: "flow" needs python-igraph (a compiled max-flow solver): '
                'pip install "lensattr[flow]"  (or: pip install igraph)')
    return tuple(c for c in CLAIM_SOURCES if c in chosen)


Layered = Float[Tensor, "batch layer query_pos key_pos"]


def layer_claims(
    patterns: Float[Tensor, "batch layer head_index query_pos key_pos"],
    prompts: PromptSet,
    read_rows: Tensor,
    causal: bool,
    sources: tuple[str, ...],
) -> dict[str, Layered]:
    """Rollout and flow (those of them in ``sources``) up to and including each layer:
    ``[batch, layer, query_pos, key_pos]``. Rollout is computed for every query; flow only at
    ``read_rows`` ([batch, pos] bool; NaN elsewhere)."""
    out: dict[str, Tensor] = {}
    if "rollout" not in sources and "flow" not in sources:
        return out
    mask = prompts.attention_mask
    mixed = mix_residual(patterns.double().mean(2), 0.5, mask)  # [b, L, q, k]
    if "rollout" in sources:
        out["rollout"] = attention_rollout(mixed).joint.float()
    if "flow" in sources:
        out["flow"] = torch.stack([
            attention_flow(mixed[:, : li + 1], mask, causal, queries=read_rows).values
            for li in range(mixed.shape[1])
        ], 1).float()
    return out


def at_rows(x: Float[Tensor, "batch query_pos key_pos"], read_rows: Tensor,
            mean: bool = False) -> Float[Tensor, "batch key_pos"]:
    """A claim summed (or averaged) over the read rows; NaN-free where the rows are defined."""
    w = read_rows.float()[:, :, None]  # [b, q, 1]
    s = (torch.nan_to_num(x) * w).sum(1)
    return s / w.sum(1).clamp(min=1) if mean else s


def _per_head(x: Tensor, layer: int, head: int) -> Tensor:
    """[b, q, k] of one head from a per-head [b, L, H, q, k] or layer-level [b, L, q, k]."""
    return x[:, layer, head] if x.ndim == 5 else x[:, layer]


def head_claim_columns(
    head, edges: list, claim_tensors: dict[str, Tensor], claims: Claims, prompts: PromptSet,
    sources: list[Tensor], names: list[str], floor: float = 0.0,
) -> dict:
    """Per-head summary of every claim source: ``<source>_top_source`` (the examined source it
    points at most, from the read rows, averaged over prompts; raw and norm already have
    ``top_source`` / ``norm_top_source``, so only rollout and flow get one here) and
    ``agree_<source>``: Spearman's rho, over the head's examined sources, between the claim
    (mean over prompts) and the mean |single-edge removal effect| (the verdict's baseline).
    NaN with fewer than 3 examined sources or a constant side. Mean effects below ``floor``
    (float32 rounding, :func:`~lensattr.compare.agreement.noise_floor`) rank as 0."""
    n = len(prompts)
    b_idx = torch.arange(n)
    eff = torch.stack([e.per_prompt.abs() for e in edges], 1).double()  # [b, j]
    ok_src = torch.stack([s >= 0 for s in sources], 1)  # [b, j]
    eff = floor_effects(torch.where(ok_src, eff, math.nan).nanmean(0), floor)  # [j]
    row: dict[str, float | str] = {}
    for src, x in claim_tensors.items():
        a = at_rows(_per_head(x, head.layer, head.head), claims.read_rows)  # [b, k]
        c = torch.stack([torch.where(s >= 0, a[b_idx, s.clamp(min=0)], math.nan)
                         for s in sources], 1).double().nanmean(0)  # [j]
        keep = ~(torch.isnan(c) | torch.isnan(eff))
        row[f"agree_{src}"] = float(spearman(c[keep], eff[keep])) if keep.sum() >= 3 \
            else math.nan
        if src in ("rollout", "flow"):
            best = int(torch.nan_to_num(c, nan=-math.inf).argmax()) if keep.any() else None
            row[f"{src}_top_source"] = names[best] if best is not None else ""
            row[f"{src}_top_mass"] = float(c[best]) if best is not None else math.nan
    return row
