"""Attribution patching beside the exact evidence: the audit's AtP columns and agreement.

AtP (noising: ``(z_corr - z_clean) . dm/dz`` at the clean run, :func:`lensattr.atp`) is a
first-order estimate of what ``ablation_resample`` measures exactly: patching a head's
corrupted output into the clean run. The audit reports it per head, normalised like the
effects (``atp_resample`` = mean AtP / mean(m_ref - m0)), with its rank, and in
``meta["atp"]`` how well it ranks the heads against the exact resample effects (Spearman,
Kendall, recall of the top heads, the worst miss), so a user sees when the approximation fails.
It also estimates each examined edge's pattern-patching effect (``atp_pattern`` beside the
exact ``effect_pattern`` in the edges table; ``meta["atp"]["edge_agreement_with_exact"]``).
No verdict reads AtP: every verdict rests on exact interventions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..compare.atp_agreement import atp_agreement
from ..compare.judge import Effects
from ..core.metric import MetricError
from ..core.prompts import PromptSet
from ..core.types import AblationMethod, HeadId
from ..evidence.attribution import atp
from ..evidence.keys import Kind, key
from ..models.adapter import Adapter, ModelError
from ..stats.agreement import kendall, spearman

__all__ = ["atp_columns"]


def atp_columns(adapter: Adapter, prompts: PromptSet, metric, heads: list[HeadId],
                eff: Effects, methods: list[AblationMethod], batch_size: int,
                read_rows: Tensor | None = None, sources: list[Tensor] | None = None,
                pattern_edges: list | None = None, floor: float = 0.0,
                ) -> tuple[dict[HeadId, dict], dict[HeadId, list[float]], dict]:
    """(per head: ``atp_resample``, ``atp_rank``; per head, AtP's estimate of each examined
    edge's ``effect_pattern`` (``atp_pattern``); the record for ``meta["atp"]``).

    ``read_rows`` [batch, pos] and ``sources`` (one [batch] tensor of positions per examined
    source, -1 = absent) name the edges; ``pattern_edges`` (per head, in the order of
    ``heads``: the exact pattern-patching estimates per source, or None) gives the edge
    agreement (exact effects below ``floor``, float32 rounding, count as 0)."""
    sources = sources or []
    nan = {h: {"atp_resample": math.nan, "atp_rank": math.nan} for h in heads}
    nan_edges = {h: [math.nan] * len(sources) for h in heads}
    if prompts.corrupted is None:
        return nan, nan_edges, {"computed": False, "why": "AtP needs corrupted prompts"}
    try:
        r = atp(adapter, prompts, metric, mode="noising", batch_size=max(1, batch_size))
    except (ValueError, ModelError, MetricError) as e:  # e.g. a metric with no gradient
        return nan, nan_edges, {"computed": False, "why": str(e)}
    den = float(eff.den.mean())
    est = r.heads.mean(0) / den  # [layer, head]
    mag = torch.tensor([abs(float(est[h.layer, h.head])) for h in heads])
    rank = torch.empty(len(heads), dtype=torch.long)
    rank[mag.argsort(descending=True)] = torch.arange(1, len(heads) + 1)
    cols = {h: {"atp_resample": float(est[h.layer, h.head]), "atp_rank": int(rank[i])}
            for i, h in enumerate(heads)}
    record = {"computed": True, "mode": "noising", "path": r.meta.get("path"),
              "definition": "atp_resample = mean over prompts of (z_corr - z_clean) . dm/dz "
              "at the clean run, / mean(m_ref - m0): AtP's estimate of ablation_resample; "
              "atp_pattern (edges) = mean over prompts of (alpha_c - alpha) . dm/dalpha of the "
              "edge's entries at the read rows, / mean(m_ref - m0): AtP's estimate of "
              "effect_pattern"}
    per_edge = _edge_estimates(r.edges, heads, read_rows, sources)  # head -> [source, batch]
    edges = {h: [float(x[ok].mean()) / den if ok.any() else math.nan
                 for x, ok in zip(per_edge[h], [s >= 0 for s in sources], strict=True)]
             for h in heads}
    if AblationMethod.RESAMPLE in methods:
        exact = torch.full(r.heads.shape, math.nan)  # [batch, layer, head]
        approx = torch.full(r.heads.shape, math.nan)
        for h in heads:
            solo = eff.values[key(Kind.ABLATE, h, baseline="resample")]
            exact[:, h.layer, h.head] = solo - eff.m0
            approx[:, h.layer, h.head] = r.heads[:, h.layer, h.head]
        agreement = atp_agreement(approx, exact, top=min(5, len(heads)))
        record["agreement_with_exact"] = agreement.summary()
        if pattern_edges is not None:
            record["edge_agreement_with_exact"] = _edge_agreement(edges, heads, pattern_edges,
                                                                  floor)
    return cols, edges, record


def _edge_estimates(edges: Tensor, heads, read_rows, sources) -> dict[HeadId, list[Tensor]]:
    """Per head and source, AtP per prompt [batch]: the entries (read rows -> source) summed
    (NaN where AtP has no pattern estimate, or the source is absent)."""
    n = edges.shape[0]
    b = torch.arange(n)
    out = {}
    for h in heads:
        e = edges[:, h.layer, h.head]  # [batch, q, k]
        rows = read_rows.to(e.device)[:, :, None]  # [batch, q, 1]
        at_rows = torch.where(rows, e, torch.zeros((), dtype=e.dtype)).sum(1)  # [batch, k]
        missing = (torch.isnan(e) & rows).any(1)  # [batch, k]
        vals = torch.where(missing, torch.nan, at_rows)
        out[h] = [torch.where(s >= 0, vals[b, s.clamp(min=0)], torch.nan) for s in sources]
    return out


def _edge_agreement(atp_edges: dict, heads, pattern_edges, floor: float) -> dict:
    """Spearman and Kendall of |AtP| against |exact pattern-patching effect| over every
    measured edge (exact effects below ``floor`` count as 0), and the share of the (up to) 10
    exactly strongest non-zero edges that AtP ranks in its top as many."""
    a, e = [], []
    for h, ests in zip(heads, pattern_edges, strict=True):
        for x, ex in zip(atp_edges[h], ests or [], strict=False):
            if math.isfinite(x) and math.isfinite(ex.value):
                a.append(abs(x))
                e.append(abs(ex.value) if abs(ex.value) >= floor else 0.0)
    nonzero = sum(1 for x in e if x > 0)
    out: dict[str, object] = {"n_edges": len(a), "n_nonzero_exact": nonzero, "spearman": math.nan,
           "kendall": math.nan, "recall_at_top": math.nan, "top": min(10, nonzero)}
    if nonzero == 0:
        out["why"] = ("no measured edge's exact pattern-patching effect differs from 0: the "
                      "heads' attention weights at the read rows do not change between clean "
                      "and corrupted prompts in a way the metric sees" if a else
                      "no edge was measured (no head cleared the null margin, or the zero "
                      "baseline)")
        return out
    if len(a) >= 3:
        ta, te = torch.tensor(a), torch.tensor(e)
        out["spearman"] = float(spearman(ta, te))
        out["kendall"] = float(kendall(ta, te)) if len(a) <= 2000 else math.nan
    k = min(10, nonzero)
    strong = set(torch.tensor(e).argsort(descending=True)[:k].tolist())
    top_atp = set(torch.tensor(a).argsort(descending=True)[:k].tolist())
    out["recall_at_top"] = len(strong & top_atp) / k
    return out
