"""Tidy rows for the heads and edges tables (pure formatting of computed results)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from ..claims import Claims
from ..compare.locus import LocusEdges, effect_locus
from ..compare.verdicts import HeadEvidence, Verdict, interpretive_change
from ..core.prompts import PromptSet
from ..core.types import HeadId
from ..stats.inference import Estimate

__all__ = ["HeadResult", "head_row", "edge_rows", "source_positions", "position_name",
           "rank_baseline_flags"]


def position_name(prompts: PromptSet, pos: int) -> str:
    role = prompts.role_of(pos) if prompts.aligned else None
    return role if role is not None else f"pos{pos}"


def _mode_name(prompts: PromptSet, positions: torch.Tensor) -> str:
    """The most common source, named by role where the prompts agree on one; a tie goes to
    the name that comes first in prompt order (deterministic: not by set order, which
    Python's string hashing changes from one process to the next)."""
    names = []
    for i, p in enumerate(positions.tolist()):
        role = next((k for k, v in prompts.roles.items() if int(v[i]) == p), None)
        names.append(role if role is not None else f"pos{p}")
    return max(dict.fromkeys(names), key=names.count)


def source_positions(prompts: PromptSet, claims: Claims, read_pos, max_sources: int):
    """Sources examined edge by edge from the read rows.

    Aligned prompts: every key the last read row may attend (later keys too in an encoder), if
    there are at most ``max_sources``; else the sinks, the roles and the most attended keys.
    Unaligned prompts: the role positions (a sink only where the prompts declare one).
    Returns ([batch] tensors, names)."""
    n = len(prompts)
    if prompts.aligned:
        last = int(read_pos.max())
        cand = [int(k) for k in claims.allowed[0, last].nonzero()[:, 0]]
        if len(cand) > max_sources:
            rows = claims.read_rows.float()[:, None, None, :, None]  # [batch, 1, 1, q, 1]
            att = (claims.patterns * rows).sum((0, 1, 2, 3))  # [k]: attention from read rows
            keep = {int(k) for k in claims.sink[0].nonzero()[:, 0]}
            keep |= {int(v[0]) for v in prompts.roles.values()}
            for k in att.argsort(descending=True).tolist():
                if len(keep) >= max_sources:
                    break
                keep.add(k)
            cand = sorted(k for k in keep if k in cand)
        return ([torch.full((n,), k) for k in cand], [position_name(prompts, k) for k in cand])
    roles = {k: v for k, v in prompts.roles.items() if k != "END"}
    return list(roles.values()), list(roles.keys())


_NAN = Estimate.nan(1)


def _ci(prefix: str, e: Estimate) -> dict:
    return {prefix: e.value, f"{prefix}_lo": e.lo, f"{prefix}_hi": e.hi}


@dataclass
class HeadResult:
    """Everything the audit measured and decided for one head (effects under the primary
    baseline unless keyed by baseline)."""

    head: HeadId
    effects: dict[str, Estimate]  # ablation method -> normalised effect
    split: dict[str, Estimate]  # read / other: ablated at the read rows only, other rows only
    knockouts: dict[str, Estimate]  # remove / keep / renorm of the claimed set, sink removal
    routing: Estimate
    routing_by: dict[str, Estimate]  # baseline -> routing ratio
    direct: Estimate
    evidence: HeadEvidence
    verdict: Verdict
    by_baseline: dict[str, Verdict]
    p: float
    carriers: str
    edges: list[Estimate]  # per examined source: effect of removing the edges to it
    # per examined source: effect of patching only the weights of the edges to it; the whole
    # read row's weights patched (both NaN where not computed: zero baseline, screened out)
    pattern_edges: list[Estimate] | None = None
    pattern_read: Estimate | None = None
    locus: LocusEdges | None = None  # edges at the row where the effect lives, if not read


def head_row(r: HeadResult, claims: Claims, prompts: PromptSet, norm: torch.Tensor | None = None
             ) -> dict:
    L, H = r.head.layer, r.head.head
    row = {
        "layer": L,
        "head": H,
        "head_type": claims.head_type[L][H],
        "claim_score": float(claims.claim_score[L, H]),
        "head_type_read": claims.head_type_read[L][H],
        "claim_score_read": float(claims.claim_score_read[L, H]),
    }
    for name, s in claims.scores.items():
        row[f"score_{name}"] = float(s[L, H])
    row["top_source"] = _mode_name(prompts, claims.top_source[:, L, H])
    row["top_mass"] = float(claims.top_mass[:, L, H].mean())
    row["sink_mass"] = float(claims.sink_mass_read[L, H])
    if norm is not None:  # norm-based attention (Kobayashi 2020) at the read rows
        row.update(_norm_cols(r, claims, prompts, norm))
    row["entropy"] = float(claims.entropy_read[L, H])
    row["diffuse"] = bool(claims.diffuse[L, H])
    row.update(_evidence_cols(r))
    row.update(_verdict_cols(r, prompts))
    return row


def _norm_cols(r: HeadResult, claims: Claims, prompts: PromptSet, norm: torch.Tensor) -> dict:
    L, H = r.head.layer, r.head.head
    row: dict = {}
    w = claims.read_rows.float()[:, :, None]
    nr = norm[:, L, H]  # [b, q, k]; NaN rows: the head writes nothing there
    defined = (torch.isfinite(nr).all(-1).float() * w[..., 0])  # [b, q]
    at = (torch.nan_to_num(nr) * defined[..., None]).sum(1)  # [b, k]
    got = defined.sum(1) > 0  # prompts where a read row has shares
    at = at / defined.sum(1, keepdim=True).clamp(min=1)
    if got.any():
        top = at[got].max(-1)
        row["norm_top_source"] = _mode_name(prompts.take(got.nonzero()[:, 0]), top.indices)
        row["norm_top_mass"] = float(top.values.mean())
        row["norm_sink_mass"] = float((at[got] * claims.sink[got].float()).sum(-1).mean())
    else:
        row["norm_top_source"] = "(writes nothing)"
        row["norm_top_mass"] = row["norm_sink_mass"] = math.nan
    return row


def _evidence_cols(r: HeadResult) -> dict:
    """Effects, knockouts, routing and compensation tests with their intervals."""
    v, row = r.verdict, {}
    for m in ("zero", "mean", "resample"):
        row.update(_ci(f"ablation_{m}", r.effects.get(m, _NAN)))
    row.update(_ci("effect_read_rows", r.split["read"]))
    row.update(_ci("effect_other_rows", r.split["other"]))
    row.update(_ci("pattern_read", r.pattern_read if r.pattern_read is not None else _NAN))
    ev = r.evidence
    row["effect_locus"] = "n/a" if ev.too_few else effect_locus(
        ev.effect, r.split["read"], r.split["other"], r.verdict.relevance == "relevant")
    row.update(_ci("knockout_claimed", r.knockouts["remove"]))
    row.update(_ci("knockout_unclaimed", r.knockouts["keep"]))
    row.update(_ci("knockout_claimed_renorm", r.knockouts["renorm"]))
    row.update(_ci("sink_effect", r.knockouts["sink"]))
    row.update(_ci("routing", r.routing))
    row.update(_ci("sink_share", ev.sink if ev.sink is not None else _NAN))
    row.update(_ci("necessity", ev.necessity if ev.necessity is not None else _NAN))
    row["interval_level"] = ev.level
    row.update(_ci("effect_selected", ev.effect))  # e's interval the verdict read (FCR level)
    row["effect_level"] = ev.effect_level
    for m in ("zero", "mean", "resample"):
        row[f"routing_{m}"] = r.routing_by[m].value if m in r.routing_by else math.nan
    row.update(_ci("direct_effect", r.direct))
    row["p_value"], row["q_value"], row["q_null"] = r.p, r.evidence.q, r.evidence.q_null
    row["relevance"], row["routing_class"] = v.relevance, v.routing_class
    partner = v.partner
    row["partner_layer"] = partner.layer if partner else None
    row["partner_head"] = partner.head if partner else None
    row["partner"] = str(partner) if partner else ""
    comp = r.evidence.compensation
    row.update(_ci("joint_effect", comp.joint if comp.joint is not None else _NAN))
    row.update(_ci("interaction", comp.interaction if comp.interaction is not None else _NAN))
    dmt = comp.direct_minus_total
    row.update(_ci("direct_minus_total", dmt if dmt is not None else _NAN))
    return row  # fmt: skip


def _verdict_cols(r: HeadResult, prompts: PromptSet) -> dict:
    """Carriers, the label, its rule and sentence, and the labels under every baseline."""
    v = r.verdict
    row: dict[str, object] = {}
    row["carriers"] = r.carriers
    row["carriers_row"] = (position_name(prompts, r.locus.row) if r.locus is not None
                           else ("read rows" if r.carriers else ""))
    row["baseline"] = v.baseline
    row["verdict"] = v.label
    row["verdict_rule"] = v.rule
    row["verdict_share"] = v.share
    row["reason"] = v.reason
    under = [f"{b}:{x.partner}" if x.partner else b
             for b, x in r.by_baseline.items() if x.compensated]
    row["compensated_under"] = ",".join(under)
    row["labels_by_baseline"] = ",".join(f"{b}={x.label}" for b, x in r.by_baseline.items())
    # flagged only when the claim changes (relevant vs null, or the routing class), ranked
    # by what is at stake: the largest |effect| under any baseline (rank_baseline_flags)
    row["baseline_sensitive"] = interpretive_change(x.label for x in r.by_baseline.values())
    row["baseline_stake"] = max((abs(e.value) for e in r.effects.values()
                                 if math.isfinite(e.value)), default=math.nan)
    return row  # fmt: skip


def rank_baseline_flags(heads: pd.DataFrame) -> pd.DataFrame:
    """``baseline_flag_rank``: 1 for the flagged head with the most at stake (largest
    |effect| under any baseline), 2 for the next, ...; NaN for heads not flagged."""
    heads = heads.copy()
    rank = pd.Series(math.nan, index=heads.index)
    if len(heads) and "baseline_sensitive" in heads.columns:
        flagged = heads[heads["baseline_sensitive"].astype(bool)]
        order = flagged["baseline_stake"].fillna(-1).sort_values(ascending=False, kind="stable")
        rank[order.index] = range(1, len(order) + 1)
    heads["baseline_flag_rank"] = rank.astype("Int64") if len(heads) else rank
    return heads


def edge_rows(
    results: list[HeadResult], claims: Claims, prompts: PromptSet, sources, names,
    norm: torch.Tensor | None = None, layered: dict | None = None,
    atp: dict | None = None,
) -> pd.DataFrame:
    """One row per head and examined source: attention from the read rows (summed over them,
    averaged over prompts), the share of prompts whose claimed set holds it, and the effects of
    removing those edges and of patching only their weights (``effect_pattern``) under the
    verdict's baseline. ``layered``: layer-level claims (``rollout``, ``flow``: [b, L, q, k],
    the value up to and including the edge's layer), each a column read like ``attention``
    (NaN where not computed). ``atp``: head -> AtP's estimate of ``effect_pattern`` per
    examined source (column ``atp_pattern``)."""
    layered = layered or {}
    atp = atp or {}
    rows_idx = torch.arange(len(prompts))
    read = claims.read_rows  # [batch, q]
    single = bool((read.sum(1) == 1).all())
    out = []
    for r in results:
        L, H = r.head.layer, r.head.head
        w = read.float()[:, :, None]
        alpha = (claims.patterns[:, L, H] * w).sum(1)  # [batch, k]: attention from read rows
        nrm = None if norm is None else (torch.nan_to_num(norm[:, L, H]) * w).sum(1)
        claimed = (claims.claimed[:, L, H] & read[:, :, None]).any(1)  # [batch, k]
        lay = {k: (torch.nan_to_num(x[:, L]) * w).sum(1) for k, x in layered.items()}
        pattern = r.pattern_edges or [_NAN] * len(sources)
        atp_h = atp.get(r.head, [math.nan] * len(sources))
        for j, (src, name, e) in enumerate(zip(sources, names, r.edges, strict=True)):
            ok = src >= 0
            s = src.clamp(min=0)
            out.append({
                "layer": L, "head": H,
                "query_role": ("END" if "END" in prompts.roles else "read") if single
                else "read rows",
                "query_pos": int(claims.read_pos[0]) if prompts.aligned and single else math.nan,
                "source_role": name,
                "source_pos": int(src[0]) if prompts.aligned else math.nan,
                "is_sink": bool(claims.sink[rows_idx, s][ok].all()),
                "attention": float(torch.where(ok, alpha[rows_idx, s], torch.nan).nanmean()),
                "norm_attention": math.nan if nrm is None
                else float(torch.where(ok, nrm[rows_idx, s], torch.nan).nanmean()),
                "claimed_share": float(claimed[rows_idx, s][ok].float().mean()),
                **{k: float(torch.where(ok, a[rows_idx, s], torch.nan).nanmean())
                   for k, a in lay.items()},
                "baseline": r.verdict.baseline,
                **_ci("effect_remove", e),
                **_ci("effect_pattern", pattern[j]),
                "atp_pattern": atp_h[j],
            })  # fmt: skip
        if r.locus is not None:  # edges where the effect lives
            q = r.locus.row
            for k, e in zip(r.locus.sources, r.locus.edges, strict=True):
                out.append({
                    "layer": L, "head": H, "query_role": position_name(prompts, q),
                    "query_pos": q, "source_role": position_name(prompts, k), "source_pos": k,
                    "is_sink": bool(claims.sink[:, k].all()),
                    "attention": float(claims.patterns[:, L, H, q, k].mean()),
                    "norm_attention": math.nan if norm is None
                    else float(norm[:, L, H, q, k].nanmean()),
                    "claimed_share": float(claims.claimed[:, L, H, q, k].float().mean()),
                    **{n: float(x[:, L, q, k].nanmean()) for n, x in layered.items()},
                    "baseline": r.verdict.baseline, **_ci("effect_remove", e),
                    **_ci("effect_pattern", _NAN), "atp_pattern": math.nan,
                })  # fmt: skip
    return pd.DataFrame(out)
