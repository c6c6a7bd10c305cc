"""Where a head's effect lives, and its edges there.

The tables describe the metric's read rows, while ablations act at every position. A head whose
effect comes mostly from other rows (ablating it at the read rows alone does little, at the
other rows a lot) is examined where its effect lives: it is ablated one row at a time (aligned
prompts only, where a row is a role), the row with the largest effect is taken, and the single
edges of that row are removed one source at a time, under the verdict's baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..claims import Claims
from ..core.prompts import PromptSet
from ..core.types import AblationMethod, HeadId
from ..evidence.interventions import ablate
from ..evidence.keys import Kind, key
from ..evidence.sweeps import edge_sweep
from ..stats.inference import Estimate
from .judge import Effects
from .verdicts import Thresholds

__all__ = ["LocusEdges", "effect_locus", "needs_locus", "locus_edges"]


@dataclass
class LocusEdges:
    """One head's edges at the row where its effect lives."""

    head: HeadId
    row: int  # query position (aligned prompts)
    row_effect: Estimate  # the head ablated at that row only
    sources: list[int]
    edges: list[Estimate]  # per source: the edge (row -> source) removed


def effect_locus(e: Estimate, read: Estimate, other: Estimate, relevant: bool) -> str:
    """Where a relevant head's effect lives (the table's ``effect_locus``): ``read rows`` when
    ablating it at the read rows alone gives >= 0.7 of its effect and the other rows < 0.3,
    ``other rows`` the other way round, else ``both``; ``n/a`` when not relevant or unmeasured.
    :func:`needs_locus`, which decides whose edges are examined elsewhere, uses the looser
    half-and-half split, so every ``other rows`` head and the other-dominated ``both`` heads
    get examined where their effect lives."""
    if not (math.isfinite(read.value) and math.isfinite(other.value)):
        return "n/a"
    if not relevant or abs(e.value) < 1e-9:
        return "n/a"
    if abs(read.value) >= 0.7 * abs(e.value) and abs(other.value) < 0.3 * abs(e.value):
        return "read rows"
    if abs(other.value) >= 0.7 * abs(e.value) and abs(read.value) < 0.3 * abs(e.value):
        return "other rows"
    return "both"


def needs_locus(e: Estimate, read: Estimate, other: Estimate, th: Thresholds) -> bool:
    """The effect clears the null margin and at least half of it comes from other rows."""
    if not (e.lo > th.delta or e.hi < -th.delta) or not math.isfinite(other.value):
        return False
    return abs(other.value) >= 0.5 * abs(e.value) and abs(read.value) < 0.5 * abs(e.value)


def locus_edges(
    run, eff: Effects, heads: list[HeadId], method: AblationMethod, claims: Claims,
    prompts: PromptSet, max_sources: int,
) -> dict[HeadId, LocusEdges]:
    """``run(interventions) -> {key: values}`` runs and records the interventions."""
    if not heads or not prompts.aligned:
        return {}
    n, p = prompts.tokens.shape
    rows = [q for q in range(p) if not bool(claims.read_rows[0, q])]
    plan = []
    for h in heads:
        for q in rows:
            mask = torch.zeros(n, p, dtype=torch.bool)
            mask[:, q] = True
            plan.append(ablate(h, method=method, rows=mask,
                               label=key(Kind.ROW, h, baseline=method, row=q)))
    eff.values.update(run(plan))
    out, plan, chosen = {}, [], {}
    for h in heads:
        effects = {q: eff(key(Kind.ROW, h, baseline=method, row=q)) for q in rows}
        q = max(effects, key=lambda k: abs(effects[k].value) if math.isfinite(effects[k].value)
                else -1.0)
        keys = [int(k) for k in claims.allowed[0, q].nonzero()[:, 0]]
        if len(keys) > max_sources:  # the most attended keys of that row
            att = claims.patterns[:, h.layer, h.head, q].mean(0)
            keys = sorted(sorted(keys, key=lambda k: -float(att[k]))[:max_sources])
        at = torch.zeros(n, p, dtype=torch.bool)
        at[:, q] = True
        srcs = [torch.full((n,), k) for k in keys]
        plan += edge_sweep([h], at, srcs, p, method, kind=Kind.LOCUS_EDGE)
        chosen[h] = (q, effects[q], keys)
    eff.values.update(run(plan))
    for h, (q, e_q, keys) in chosen.items():
        edges = [eff(key(Kind.LOCUS_EDGE, h, baseline=method, source=j))
                 for j in range(len(keys))]
        out[h] = LocusEdges(h, q, e_q, keys, edges)
    return out
