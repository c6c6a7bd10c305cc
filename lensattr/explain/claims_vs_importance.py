"""The Abnar & Zuidema (2020) table for any model and task: how well do attention-based claims
rank the input tokens the way token attributions do, layer by layer?

Claims per layer l, read at the metric's query rows (averaged over them when the metric reads
several, e.g. mean pooling), one value per source token:

* ``raw``: layer l's attention averaged over heads;
* ``norm``: norm-based attention of layer l (Kobayashi et al. 2020, ``||sum_h alpha f_h(x)||``);
* ``rollout``: attention rollout up to and including layer l (residual weight 0.5);
* ``flow``: attention flow (exact max flow) up to and including layer l (needs igraph).

Each is rank-correlated with the absolute importance of each method (Spearman and Kendall
within each prompt, averaged over prompts, with bootstrap CIs over prompts) through
:func:`lensattr.compare.agreement.rank_agreement`. Sources a query cannot see (padding, and in
a causal model tokens after the last read row) are left out.
"""

from __future__ import annotations

from typing import cast

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..claims.norms import norm_attention
from ..claims.rollout import attention_rollout, layer_matrices
from ..stats.agreement import rank_agreement
from .setup import Setup

__all__ = ["CLAIMS", "layer_claims", "agreement_table"]

CLAIMS = ("raw", "norm", "rollout", "flow")


def _at_rows(m: Float[Tensor, "batch layer query_pos key_pos"], rows: Tensor,
             seen: Tensor) -> Float[Tensor, "batch layer key_pos"]:
    w = rows.double()[:, None, :, None]  # [b, 1, q, 1]
    out = (m.double() * w).sum(2) / w.sum(2).clamp(min=1)
    return torch.where(seen[:, None], out, torch.nan)


def layer_claims(s: Setup, claims=CLAIMS) -> dict[str, Tensor]:
    """claim name -> [batch, layer, key_pos] at the read rows (NaN on unseen sources). A claim
    whose dependency is missing (flow without igraph) is left out and named in ``skipped``."""
    claims = tuple(claims)
    bad = [c for c in claims if c not in CLAIMS]
    if bad or not claims:
        raise ValueError(f"claims: expected some of {CLAIMS}, got {claims!r}")
    a, p = s.adapter, s.prompts
    rows = s.rows
    seen = (s.allowed & rows[:, :, None]).any(1)  # [b, k]: visible from some read row
    out: dict[str, Tensor] = {}
    if "raw" in claims:
        raw = torch.stack([pat.double().mean(1) for pat in s.clean.patterns], 1)
        out["raw"] = _at_rows(raw, rows, seen)
    if "norm" in claims:
        out["norm"] = _at_rows(norm_attention(a, p.tokens, p.attention_mask).per_layer, rows,
                               seen)
    mixed = None
    if "rollout" in claims or "flow" in claims:
        mixed = layer_matrices(a, p.tokens, p.attention_mask)
    if "rollout" in claims:
        out["rollout"] = _at_rows(attention_rollout(cast(Tensor, mixed)).joint, rows, seen)
    if "flow" in claims:
        try:
            from ..claims.flow import attention_flow

            per = []
            for li in range(a.n_layers):
                f = attention_flow(cast(Tensor, mixed)[:, :li + 1], p.attention_mask, a.is_causal,
                                   queries=rows).values.nan_to_num(0.0)
                per.append(f)
            out["flow"] = _at_rows(torch.stack(per, 1), rows, seen)
        except ImportError:
            pass
    return out


def agreement_table(claims: dict[str, Tensor], scores: dict[str, Tensor], n_boot: int = 1000,
                    seed: int = 0) -> pd.DataFrame:
    """One row per (claim, method, layer) plus an all-layers row per pair (layer <NA>)."""
    frames = []
    for cname, c in claims.items():
        for mname, sc in scores.items():
            imp = sc.abs()[:, None].expand_as(c)
            imp = torch.where(torch.isnan(c), torch.nan, imp)
            f = rank_agreement(c, imp, layer_dim=1, how="per_prompt", n_boot=n_boot, seed=seed)
            f.insert(0, "method", mname)
            f.insert(0, "claim", cname)
            frames.append(f)
    return pd.concat(frames, ignore_index=True)
