"""Tidy rows for the heads and edges tables (pure formatting of computed results)."""

from __future__ import annotations

import math

import pandas as pd
import torch

from .claims import Claims
from .claims.head_types import SINK_ROLES
from .compare.stats import Estimate, ratio_of_means
from .evidence.sweeps import label
from .prompts import PromptSet

__all__ = ["head_row", "edge_rows", "source_positions", "position_name"]


def position_name(prompts: PromptSet, pos: int) -> str:
    role = prompts.role_of(pos) if prompts.aligned else None
    return role if role is not None else f"pos{pos}"


def _mode_name(prompts: PromptSet, positions: torch.Tensor) -> str:
    """The most common source, named by role where the prompts agree on one."""
    names = []
    for i, p in enumerate(positions.tolist()):
        role = next((k for k, v in prompts.roles.items() if int(v[i]) == p), None)
        names.append(role if role is not None else f"pos{p}")
    return max(set(names), key=names.count)


def source_positions(prompts: PromptSet, claims: Claims, read_pos, max_sources: int):
    """Sources examined edge by edge at the read position.

    Aligned prompts: every position up to the read position (if there are at most
    ``max_sources``, else the sink, the roles and the most attended positions). Unaligned
    prompts: the role positions and the sink. Returns ([batch] tensors, names)."""
    n = len(prompts)
    if prompts.aligned:
        last = int(read_pos.max())
        cand = (
            list(range(last + 1))
            if claims.allowed[0, last].all()
            else [int(k) for k in claims.allowed[0, last].nonzero()[:, 0]]
        )
        if len(cand) > max_sources:
            att = claims.patterns[:, :, :, last].mean((0, 1, 2))  # [k]
            keep = {int(k) for k in claims.sink[0].nonzero()[:, 0]}
            keep |= {int(v[0]) for v in prompts.roles.values()}
            for k in att.argsort(descending=True).tolist():
                if len(keep) >= max_sources:
                    break
                keep.add(k)
            cand = sorted(k for k in keep if k in cand)
        return ([torch.full((n,), k) for k in cand], [position_name(prompts, k) for k in cand])
    roles = {k: v for k, v in prompts.roles.items() if k != "END"}
    if not any(r in roles for r in SINK_ROLES):
        roles = {"BOS": claims.sink.long().argmax(1), **roles}
    return list(roles.values()), list(roles.keys())


def _ci(prefix: str, e: Estimate) -> dict:
    return {prefix: e.value, f"{prefix}_lo": e.lo, f"{prefix}_hi": e.hi}


def head_row(
    h,
    claims: Claims,
    prompts: PromptSet,
    est: dict,
    ko: dict,
    rho: Estimate,
    direct: Estimate,
    comp,
    verdict,
    share,
    rel,
    rout,
    reason,
    p,
    q,
    carriers,
) -> dict:
    L, H = h.layer, h.head
    row = {
        "layer": L,
        "head": H,
        "head_type": claims.head_type[L][H],
        "claim_score": float(claims.claim_score[L, H]),
    }
    for name, s in claims.scores.items():
        row[f"score_{name}"] = float(s[L, H])
    row["top_source"] = _mode_name(prompts, claims.top_source[:, L, H])
    row["top_mass"] = float(claims.top_mass[:, L, H].mean())
    row["sink_mass"] = float(claims.sink_mass_read[L, H])
    row["entropy"] = float(claims.entropy_read[L, H])
    row["diffuse"] = bool(claims.diffuse[L, H])
    for m in ("zero", "mean", "resample"):
        row.update(_ci(f"ablation_{m}", est.get(m, Estimate.nan(1))))
    row.update(_ci("knockout_claimed", ko["remove"]))
    row.update(_ci("knockout_unclaimed", ko["keep"]))
    row.update(_ci("knockout_claimed_renorm", ko["renorm"]))
    row.update(_ci("routing", rho))
    row.update(_ci("direct_effect", direct))
    row["p_value"], row["q_value"] = p, q
    row["relevance"], row["routing_class"] = rel, rout
    partner = getattr(comp, "partner", None) if verdict == "compensated" else None
    row["partner_layer"] = partner[0] if partner else None
    row["partner_head"] = partner[1] if partner else None
    row["partner"] = f"L{partner[0]}H{partner[1]}" if partner else ""
    j = getattr(comp, "joint", None) if comp is not None else None
    row.update(_ci("joint_effect", j if j is not None else Estimate.nan(1)))
    row["carriers"] = carriers
    row["verdict"] = verdict
    row["verdict_share"] = share
    row["reason"] = reason
    return row


def edge_rows(
    heads,
    claims: Claims,
    engine,
    prompts: PromptSet,
    read_pos,
    sources,
    names,
    values,
    m0,
    den,
    n_boot,
    seed,
) -> pd.DataFrame:
    n = len(prompts)
    rows_idx = torch.arange(n)
    out = []
    for h in heads:
        L, H = h.layer, h.head
        alpha = claims.patterns[rows_idx, L, H, read_pos]  # [batch, k]
        claimed = claims.claimed[rows_idx, L, H, read_pos]  # [batch, k]
        for j, (src, name) in enumerate(zip(sources, names, strict=True)):
            ok = src >= 0
            s = src.clamp(min=0)
            a = torch.where(ok, alpha[rows_idx, s], torch.nan)
            e = ratio_of_means(
                values[label("edge", h, extra=f"@{j}")] - m0,
                den,
                n_boot=n_boot,
                seed=seed,
                label=f"edge{L}.{H}@{j}",
            )
            src_pos = int(src[0]) if prompts.aligned else math.nan
            out.append(
                {
                    "layer": L,
                    "head": H,
                    "query_role": "END" if "END" in prompts.roles else "read",
                    "query_pos": int(read_pos[0]) if prompts.aligned else math.nan,
                    "source_role": name,
                    "source_pos": src_pos,
                    "is_sink": bool(claims.sink[rows_idx, s][ok].all()),
                    "attention": float(a.nanmean()),
                    "claimed_share": float(claimed[rows_idx, s][ok].float().mean()),
                    "effect_remove": e.value,
                    "effect_remove_lo": e.lo,
                    "effect_remove_hi": e.hi,
                }
            )
    return pd.DataFrame(out)
