"""Stage 3 of the audit, the judgement: the verdict rules under every baseline and, per head,
the record of everything measured and decided (:class:`~lensattr.auditing.columns.HeadResult`;
the label follows the primary baseline)."""

from __future__ import annotations

from ..compare.judge import carriers, judge
from ..evidence.keys import Kind, key
from .columns import HeadResult, position_name
from .gather import Gathered
from .plan import AuditPlan

__all__ = ["head_results"]


def head_results(plan: AuditPlan, g: Gathered) -> list[HeadResult]:
    """One record per audited head, in the order of ``plan.heads``."""
    eff, primary, methods = g.eff, plan.primary, plan.methods
    jd = judge(eff, plan.heads, methods, g.claims.striking, g.direct, plan.thresholds,
               plan.too_few)
    p = jd.p[primary.value]
    b = primary
    results = []
    for i, h in enumerate(plan.heads):
        ev, verdict = jd.evidence[primary.value][i], jd.verdicts[primary.value][i]
        edge_est = [eff.get(key(Kind.EDGE, h, baseline=b, source=j))
                    for j in range(len(g.sources))]
        pattern_est = [eff.get(key(Kind.PATTERN, h, baseline=b, source=j))
                       for j in range(len(g.sources))]
        knock = {k.value: eff.get(key(k, h, baseline=b))
                 for k in (Kind.REMOVE, Kind.KEEP, Kind.SINK)}
        results.append(HeadResult(
            head=h,
            effects={m.value: eff(key(Kind.ABLATE, h, baseline=m)) for m in methods},
            split={k.value: eff.get(key(k, h, baseline=b)) for k in (Kind.READ, Kind.OTHER)},
            knockouts={**knock, "renorm": eff.get(key(Kind.RENORM, h))},
            routing=ev.routing,
            routing_by={m.value: jd.evidence[m.value][i].routing for m in methods},
            direct=eff.get(key(Kind.DIRECT, h, baseline=b)),
            evidence=ev, verdict=verdict,
            by_baseline={m.value: jd.verdicts[m.value][i] for m in methods},
            p=float(p[i]),
            carriers=_carriers(h, g, edge_est, ev.effect, plan)
            if plan.too_few is None else "",
            edges=edge_est,
            pattern_edges=pattern_est,
            pattern_read=eff.get(key(Kind.PATTERN_READ, h, baseline=b)),
            locus=g.locus.get(h),
        ))  # fmt: skip
    return results


def _carriers(h, g: Gathered, edge_est, e_h, plan: AuditPlan) -> str:
    """Carriers at the read rows; for a head whose effect lives at another row, at that row."""
    th = plan.thresholds
    if h in g.locus:
        loc = g.locus[h]
        return carriers(loc.edges, [position_name(plan.prompts, k) for k in loc.sources], e_h, th)
    return carriers(edge_est, g.source_names, e_h, th)
