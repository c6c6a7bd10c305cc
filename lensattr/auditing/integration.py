"""The audit's claim sources, token table and DLA columns, from the clean run it already made.

Gathers, for :func:`lensattr.audit`: norm-based attention (:mod:`.value_claims`), rollout and
flow (:mod:`.claim_sources`), their per-head summaries and agreement with the single-edge
effects, the token-importance table with occlusion evidence (:mod:`.token_importance`) and
the heads' direct logit attribution (:mod:`.head_dla`). Only the occlusion runs and the DLA
capture run the model again (one forward per (prompt, position), and one forward).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd
import torch

from ..claims.sources import FLOW_MAX_LAYERS, head_claim_columns, layer_claims
from ..claims.values import claims_vs_edges, mark_best, norm_shares
from ..compare.token_importance import token_importance
from ..evidence.head_dla import head_dla
from .columns import _mode_name

__all__ = ["ClaimColumns", "claim_columns"]


@dataclass
class ClaimColumns:
    """What the claim sources add to an audit: ``norm`` (row shares [b, L, H, q, k] or None),
    ``layered`` (rollout/flow [b, L, q, k]), ``head_rows`` (head -> extra columns),
    ``agreement`` (edges and tokens), ``tokens`` (the token table), ``meta``."""

    norm: torch.Tensor | None
    layered: dict
    head_rows: dict
    agreement: pd.DataFrame
    tokens: pd.DataFrame
    meta: dict = field(default_factory=dict)


def claim_columns(adapter, engine, prompts, metric, claims, results, chosen, sources,
                  source_names, seed: int, batch_size: int, floor: float = 0.0) -> ClaimColumns:
    """``floor``: normalised effects below it are float32 rounding and rank as 0."""
    tensors = {"raw": claims.patterns}
    norm = None
    if "norm" in chosen:
        norm, tensors["norm"] = norm_shares(engine, adapter, prompts)
    layered = layer_claims(claims.patterns, prompts, claims.read_rows, adapter.is_causal, chosen)
    tensors.update(layered)
    heads = [r.head for r in results]
    edge_agree = claims_vs_edges(claims, tensors, heads, sources,
                                 {r.head: [e.per_prompt for e in r.edges] for r in results}, seed,
                                 floor=floor)
    if any(r.pattern_edges and any(e.value == e.value for e in r.pattern_edges)
           for r in results):  # pattern patching measured (a replacement baseline)
        pattern = {r.head: [e.per_prompt for e in r.pattern_edges] for r in results}
        edge_agree = pd.concat([edge_agree, claims_vs_edges(
            claims, tensors, heads, sources, pattern, seed,
            evidence="|edge pattern-patching effect|", floor=floor)], ignore_index=True)
    ti = token_importance(adapter, prompts, metric, chosen, claims.patterns, claims.read_rows,
                          layered, batch_size)
    agreement = mark_best(pd.concat([edge_agree, ti.agreement(seed)], ignore_index=True))
    dla = head_dla(adapter, prompts, metric, heads, engine.patterns, engine.v,
                   lambda pos, keep: _mode_name(prompts.take(keep.nonzero()[:, 0]), pos))
    rows = {r.head: {**head_claim_columns(r.head, r.edges, tensors, claims, prompts, sources,
                                          source_names, floor), **dla.row(r.head)}
            for r in results}
    meta = {
        "claims": list(chosen),
        "claims_default": f"raw, norm, rollout; flow too on models of at most {FLOW_MAX_LAYERS}"
                          " layers when python-igraph is installed",
        "norm_attention": "Kobayashi et al. 2020: ||alpha[q, s] v[s] W_O|| per head (value bias "
                          "included), each row divided by its sum",
        "rollout_flow": "Abnar & Zuidema 2020 on head-averaged attention, 0.5 I + 0.5 A rows "
                        "renormalised; an edge at layer l gets the value up to and including "
                        "layer l (shared by the layer's heads); flow solved at the read rows",
        "agree_columns": "Spearman rho over a head's examined sources: claim at the read rows "
                         "(mean over prompts) vs mean |single-edge removal effect|; effects "
                         "below meta['effect_noise_floor'] (float32 rounding) rank as 0",
        "agreement_evidence": "|edge removal effect|: the edge's terms alpha*v*W_O replaced by "
                              "the baseline's; |edge pattern-patching effect|: only its weight "
                              "alpha replaced by the baseline's, the values kept",
        "tokens": json.loads(json.dumps(ti.meta)),
        "dla": dla.reason or "computed: head's direct logit attribution at the read position "
                             "(final norm scale frozen), mean over prompts; dla_top_source from "
                             "its per-source decomposition",
    }
    return ClaimColumns(norm, layered, rows, agreement, ti.to_frame(), meta)
