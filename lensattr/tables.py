"""Tidy rows for the heads and edges tables (pure formatting of computed results)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from .claims import Claims
from .claims.head_types import SINK_ROLES
from .compare.stats import Estimate
from .compare.verdicts import Compensation
from .prompts import PromptSet
from .types import HeadId

__all__ = ["HeadResult", "head_row", "edge_rows", "source_positions", "position_name"]


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


_NAN = Estimate.nan(1)


def _ci(prefix: str, e: Estimate) -> dict:
    return {prefix: e.value, f"{prefix}_lo": e.lo, f"{prefix}_hi": e.hi}


@dataclass
class HeadResult:
    """Everything the audit measured and decided for one head."""

    head: HeadId
    effects: dict[str, Estimate]  # ablation method -> normalised effect
    knockouts: dict[str, Estimate]  # remove / keep / renorm of the claimed set
    routing: Estimate
    direct: Estimate
    compensation: Compensation | None
    verdict: str
    relevance: str
    routing_class: str
    reason: str
    share: float
    p: float
    q: float
    carriers: str
    edges: list[Estimate]  # per examined source: effect of removing that one edge


def head_row(r: HeadResult, claims: Claims, prompts: PromptSet) -> dict:
    L, H = r.head.layer, r.head.head
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
        row.update(_ci(f"ablation_{m}", r.effects.get(m, _NAN)))
    row.update(_ci("knockout_claimed", r.knockouts["remove"]))
    row.update(_ci("knockout_unclaimed", r.knockouts["keep"]))
    row.update(_ci("knockout_claimed_renorm", r.knockouts["renorm"]))
    row.update(_ci("routing", r.routing))
    row.update(_ci("direct_effect", r.direct))
    row["p_value"], row["q_value"] = r.p, r.q
    row["relevance"], row["routing_class"] = r.relevance, r.routing_class
    comp = r.compensation
    partner = comp.partner if comp is not None and r.verdict == "compensated" else None
    row["partner_layer"] = partner[0] if partner else None
    row["partner_head"] = partner[1] if partner else None
    row["partner"] = f"L{partner[0]}H{partner[1]}" if partner else ""
    joint = comp.joint if comp is not None and comp.joint is not None else _NAN
    row.update(_ci("joint_effect", joint))
    row["carriers"] = r.carriers
    row["verdict"] = r.verdict
    row["verdict_share"] = r.share
    row["reason"] = r.reason
    return row  # fmt: skip


def edge_rows(
    results: list[HeadResult], claims: Claims, prompts: PromptSet, read_pos, sources, names
) -> pd.DataFrame:
    rows_idx = torch.arange(len(prompts))
    out = []
    for r in results:
        L, H = r.head.layer, r.head.head
        alpha = claims.patterns[rows_idx, L, H, read_pos]  # [batch, k]
        claimed = claims.claimed[rows_idx, L, H, read_pos]  # [batch, k]
        for src, name, e in zip(sources, names, r.edges, strict=True):
            ok = src >= 0
            s = src.clamp(min=0)
            out.append({
                "layer": L, "head": H,
                "query_role": "END" if "END" in prompts.roles else "read",
                "query_pos": int(read_pos[0]) if prompts.aligned else math.nan,
                "source_role": name,
                "source_pos": int(src[0]) if prompts.aligned else math.nan,
                "is_sink": bool(claims.sink[rows_idx, s][ok].all()),
                "attention": float(torch.where(ok, alpha[rows_idx, s], torch.nan).nanmean()),
                "claimed_share": float(claimed[rows_idx, s][ok].float().mean()),
                **_ci("effect_remove", e),
            })  # fmt: skip
    return pd.DataFrame(out)
