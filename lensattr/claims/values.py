"""Value-aware claims in the audit: norm-based attention beside raw attention, and which of the
two agrees better with the causal evidence.

Norm-based attention (Kobayashi et al. 2020) weighs each source by ``||alpha[q, s] f(x_s)||``,
f the head's value-and-output map (value bias included, as ``hook_v`` holds it). The audit
reads it from the clean run's cached patterns and values (no extra forward pass), shows it at
the read rows beside the raw pattern (heads table: ``norm_top_source``, ``norm_top_mass``,
``norm_sink_mass``; edges table: ``norm_attention``), and ranks both claims against the
single-edge removal effects (Spearman and Kendall per layer, bootstrap CIs over prompts:
``Audit.agreement``).
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..stats.agreement import floor_effects, rank_agreement
from . import Claims
from .norms import norm_attention_from

__all__ = ["norm_shares", "claims_vs_edges", "mark_best", "QUIET"]

QUIET = 1e-3  # a head's row norm below this fraction of its layer's median row norm: no shares


PerEdge = Float[Tensor, "batch layer head_index q k"]


def norm_shares(engine, adapter, prompts) -> tuple[PerEdge, PerEdge]:
    """Norm-based attention of every head, each row divided by its sum. Rows where the head
    writes (almost) nothing -- total norm below ``QUIET`` times the layer's median row norm,
    e.g. a head resting on a zero-value BOS -- are NaN: their shares would be noise.
    The value bias is separated (``value_bias="separate"``): its b_V @ W_O is written whatever
    the attention, so the shares do not change when value biases are folded into b_O.
    Returns (shares, absolute norms ||alpha[q, s] f(x_s)||)."""
    L = range(adapter.n_layers)
    na = norm_attention_from(
        patterns=[p.float().cpu() for p in engine.patterns],
        values=[v.detach().float().cpu() for v in engine.v],
        W_O=[w.detach().float().cpu() for w in engine.W_O],
        b_V=[adapter.b_V(i).detach().float().cpu() for i in L],
        value_bias="separate",  # b_V @ W_O is attention-independent: the same folded or not
    )
    pair = (prompts.valid[:, :, None] & prompts.valid[:, None, :]).float()  # [b, q, k]
    na.per_head = na.per_head * pair[:, None, None]
    share = na.normalised("per_head")
    # a row whose head writes (almost) nothing has no meaningful shares: NaN, not noise
    total = na.per_head.sum(-1)  # [b, L, H, q]
    ok = prompts.valid[:, None, None, :].expand_as(total)
    ref = torch.stack([total[:, la][ok[:, la]].median() for la in L])  # per layer
    quiet = total < QUIET * ref[None, :, None, None]
    return share.masked_fill(quiet[..., None], math.nan), na.per_head


def claims_vs_edges(
    claims: Claims, claim_tensors: dict[str, Tensor], heads, sources: list[Tensor],
    edge_effects: dict, seed: int, evidence: str = "|edge removal effect|", floor: float = 0.0
) -> pd.DataFrame:
    """Rank agreement, per layer, of every claim source from the read rows to each examined
    source with |effect of removing that edge| (per prompt, the verdict's baseline), ranking
    every (head, source) item of a layer together. ``claim_tensors``: claim source (see
    :data:`~lensattr.claim_sources.CLAIM_SOURCES`) -> per-head ``[b, L, H, q, k]`` or
    layer-level ``[b, L, q, k]`` (rollout, flow: the value up to that layer, shared by its
    heads). Raw attention is a share of its own row; the norm-based claim is the absolute norm
    ||alpha f||, which is comparable across heads (a head that moves nothing claims nothing).
    ``edge_effects``: head -> list of per-prompt effects, one per source. The ``claim`` column
    names each source as the edges table does (``attention``, ``norm_attention``, ...);
    ``evidence`` names the effects (e.g. ``|edge pattern-patching effect|``); per-prompt
    effects below ``floor`` (float32 rounding) rank as 0."""
    from .sources import COLUMN, at_rows

    n = claims.patterns.shape[0]
    b_idx = torch.arange(n)
    layers = sorted({h.layer for h in heads})
    per_layer = max(sum(1 for h in heads if h.layer == la) for la in layers)
    shape = (n, len(layers), per_layer, len(sources))
    cl = {k: torch.full(shape, math.nan) for k in claim_tensors}
    eff = torch.full(shape, math.nan)
    slot = {la: 0 for la in layers}
    for h in heads:
        li, hi = layers.index(h.layer), slot[h.layer]
        slot[h.layer] += 1
        at = {k: at_rows(x[:, h.layer, h.head] if x.ndim == 5 else x[:, h.layer],
                         claims.read_rows) for k, x in claim_tensors.items()}  # [b, k]
        for j, src in enumerate(sources):
            ok = src >= 0
            s = src.clamp(min=0)
            for k, a in at.items():
                cl[k][:, li, hi, j] = torch.where(ok, a[b_idx, s], math.nan)
            eff[:, li, hi, j] = floor_effects(edge_effects[h][j].abs(), floor)
    frames = []
    for k, claim in cl.items():
        df = rank_agreement(claim, eff, layer_dim=1, seed=seed, n_boot=500)
        df.insert(1, "claim", COLUMN[k])
        df.insert(2, "evidence", evidence)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out["layer"] = out["layer"].map(lambda i: layers[int(i)] if pd.notna(i) else pd.NA)
    return out


def mark_best(agreement: pd.DataFrame) -> pd.DataFrame:
    """Add ``best``: True on the claim with the highest Spearman rho for each evidence and layer
    (the over-all-layers rows, ``layer`` <NA>, form their own group); ties all True."""
    if agreement.empty:
        return agreement
    out = agreement.copy()
    key = out["layer"].astype("Int64").astype(str)  # <NA> groups as a string of its own
    top = out.groupby([out["evidence"], key])["rho"].transform("max")
    out["best"] = out["rho"].notna() & (out["rho"] == top)
    return out
