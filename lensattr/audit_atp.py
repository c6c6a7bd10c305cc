"""Attribution patching beside the exact evidence: the audit's AtP columns and agreement.

AtP (noising: ``(z_corr - z_clean) . dm/dz`` at the clean run, :func:`lensattr.atp`) is a
first-order estimate of what ``ablation_resample`` measures exactly: patching a head's
corrupted output into the clean run. The audit reports it per head, normalised like the
effects (``atp_resample`` = mean AtP / mean(m_ref - m0)), with its rank, and in
``meta["atp"]`` how well it ranks the heads against the exact resample effects (Spearman,
Kendall, recall of the top heads, the worst miss), so a user sees when the approximation fails.
No verdict reads AtP: every verdict rests on exact interventions.
"""

from __future__ import annotations

import math

import torch

from .compare.atp_agreement import atp_agreement
from .compare.judge import Effects
from .evidence.attribution import atp
from .evidence.sweeps import label
from .metrics import MetricError
from .model import Adapter, ModelError
from .prompts import PromptSet
from .types import AblationMethod, HeadId

__all__ = ["atp_columns"]


def atp_columns(adapter: Adapter, prompts: PromptSet, metric, heads: list[HeadId],
                eff: Effects, methods: list[AblationMethod], batch_size: int
                ) -> tuple[dict[HeadId, dict], dict]:
    """(per head: ``atp_resample``, ``atp_rank``; the record for ``meta["atp"]``)."""
    nan = {h: {"atp_resample": math.nan, "atp_rank": math.nan} for h in heads}
    if prompts.corrupted is None:
        return nan, {"computed": False, "why": "AtP needs corrupted prompts"}
    try:
        r = atp(adapter, prompts, metric, mode="noising", batch_size=max(1, batch_size))
    except (ValueError, ModelError, MetricError) as e:  # e.g. a metric with no gradient
        return nan, {"computed": False, "why": str(e)}
    den = float(eff.den.mean())
    est = r.heads.mean(0) / den  # [layer, head]
    mag = torch.tensor([abs(float(est[h.layer, h.head])) for h in heads])
    rank = torch.empty(len(heads), dtype=torch.long)
    rank[mag.argsort(descending=True)] = torch.arange(1, len(heads) + 1)
    cols = {h: {"atp_resample": float(est[h.layer, h.head]), "atp_rank": int(rank[i])}
            for i, h in enumerate(heads)}
    record = {"computed": True, "mode": "noising", "path": r.meta.get("path"),
              "definition": "atp_resample = mean over prompts of (z_corr - z_clean) . dm/dz "
              "at the clean run, / mean(m_ref - m0): AtP's estimate of ablation_resample"}
    if AblationMethod.RESAMPLE in methods:
        exact = torch.full(r.heads.shape, math.nan)  # [batch, layer, head]
        approx = torch.full(r.heads.shape, math.nan)
        for h in heads:
            exact[:, h.layer, h.head] = eff.values[label("resample", h)] - eff.m0
            approx[:, h.layer, h.head] = r.heads[:, h.layer, h.head]
        agreement = atp_agreement(approx, exact, top=min(5, len(heads)))
        record["agreement_with_exact"] = agreement.summary()
    return cols, record
