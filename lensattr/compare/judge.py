"""From per-prompt metric values to verdicts: effects, routing, compensation and carriers.

Everything is computed per baseline from the evidence of that baseline only
(``<kind>-<baseline>:<head>`` labels, see :mod:`lensattr.evidence.sweeps`), and the verdict
rules of :mod:`lensattr.compare.verdicts` are applied under each. The orchestration
(:func:`lensattr.audit`) only runs the interventions and hands the values over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..evidence.sweeps import label
from ..types import AblationMethod, HeadId
from .compensation import compensation
from .ratio import ratio_p, tost_p
from .stats import Estimate, bh_qvalues, min_prompts, ratio_of_means, signflip_p
from .verdicts import Compensation, HeadEvidence, Thresholds, Verdict, decide

__all__ = ["Effects", "judge", "Judgement", "carriers", "min_prompts"]  # min_prompts: re-export


class Effects:
    """Normalised effects e = mean(m_int - m0) / mean(m_ref - m0) with Fieller 95% intervals,
    cached by label."""

    def __init__(self, values: dict[str, Tensor], m0: Tensor, den: Tensor, seed: int = 0):
        self.values, self.m0, self.den = values, m0, den
        self.seed, self._cache = seed, {}

    def __contains__(self, lbl: str) -> bool:
        return lbl in self.values

    def __call__(self, lbl: str) -> Estimate:
        if lbl not in self._cache:
            self._cache[lbl] = self.ratio(self.values[lbl] - self.m0, lbl)
        return self._cache[lbl]

    def get(self, lbl: str) -> Estimate:
        return self(lbl) if lbl in self.values else Estimate.nan(len(self.m0))

    def ratio(self, num: Tensor, lbl: str, den: Tensor | None = None) -> Estimate:
        d = self.den if den is None else den
        return ratio_of_means(num, d, label=lbl)


@dataclass
class Judgement:
    """Per baseline: each head's evidence and verdict (in the order of ``heads``)."""

    evidence: dict[str, list[HeadEvidence]]
    verdicts: dict[str, list[Verdict]]
    p: dict[str, Tensor]  # sign-flip p-values of the solo effects


def judge(
    eff: Effects,
    heads: list[HeadId],
    methods: list[AblationMethod],
    striking: Tensor,
    direct: bool,
    th: Thresholds,
    too_few: str | None,
) -> Judgement:
    evidence, verdicts, pvals = {}, {}, {}
    for m in methods:
        ev, p = _baseline_evidence(eff, heads, m, striking, direct, th, too_few)
        evidence[m.value], pvals[m.value] = ev, p
        verdicts[m.value] = [decide(x, th) for x in ev]
    return Judgement(evidence, verdicts, pvals)


def _baseline_evidence(eff, heads, m, striking, direct, th, too_few):
    b, v, m0 = m.value, eff.values, eff.m0
    e = [eff(label(b, h)) for h in heads]
    num = torch.stack([v[label(b, h)] - m0 for h in heads])  # [head, batch]
    p = signflip_p(num, seed=eff.seed)
    q = bh_qvalues(p)
    q_null = bh_qvalues(tost_p(num, eff.den.expand_as(num), th.delta).float())
    rho = [_routing(eff, h, b, e_h, th) for h, e_h in zip(heads, e, strict=True)]
    comps = _compensations(eff, heads, b, e, direct, th)
    ev = [
        HeadEvidence(h, b, e[i], float(q[i]), float(q_null[i]), rho[i],
                     bool(striking[h.layer, h.head]), comps[i], too_few)
        for i, h in enumerate(heads)
    ]  # fmt: skip
    return ev, p


def _routing(eff: Effects, h: HeadId, b: str, e_h: Estimate, th: Thresholds) -> Estimate:
    """rho = mean(m(keep only C) - m(ablated)) / mean(m0 - m(ablated)), both under ``b``;
    NaN unless the head's effect clears the null margin (nothing to route)."""
    keep = label(f"keep-{b}", h)
    if keep not in eff or not (e_h.lo > th.delta or e_h.hi < -th.delta):
        return Estimate.nan(len(eff.m0))
    abl = eff.values[label(b, h)]
    return eff.ratio(eff.values[keep] - abl, label("rho-" + b, h), den=eff.m0 - abl)


def _compensations(eff, heads, b, e, direct, th) -> list[Compensation]:
    """Partners by joint ablation, and the sign-aware direct - total effect
    s * (m(direct-<b>) - m(<b>)) / den. The same direct - total, per prompt in metric units,
    is ``lensattr.evidence.compensators(...).direct_minus_total``, which also names the heads
    whose direct effects make up the difference."""
    v, m0, den = eff.values, eff.m0, eff.den
    tests = []  # (head index, partner, joint, interaction num, sign)
    for i, h in enumerate(heads):
        for c in heads:
            lbl = label("joint-" + b, *sorted((h, c)))
            if c == h or lbl not in v:
                continue
            inter = v[lbl] - v[label(b, h)] - v[label(b, c)] + m0
            tests.append((i, c, eff(lbl), inter, 1.0 if eff(lbl).value >= 0 else -1.0))
    q_int = torch.empty(0)
    if tests:
        nums = torch.stack([s * x for *_, x, s in tests])
        p = ratio_p(nums, den.expand_as(nums), th.delta, alternative="greater").float()
        q_int = bh_qvalues(p)
    tested: list[dict] = [{} for _ in heads]
    for k, (i, c, joint, inter, _) in enumerate(tests):
        lbl = label("inter-" + b, heads[i], c)
        tested[i][c] = (joint, eff.ratio(inter, lbl), float(q_int[k]))
    dmt: list[Estimate | None] = [None] * len(heads)
    q_dmt = torch.full((len(heads),), math.nan)
    if direct and all(label(f"direct-{b}", h) in v for h in heads):
        nums = []
        for i, h in enumerate(heads):
            d = eff(label(f"direct-{b}", h))
            s = -1.0 if d.value < 0 else 1.0
            x = s * (v[label(f"direct-{b}", h)] - v[label(b, h)])
            dmt[i] = eff.ratio(x, label("dmt-" + b, h))
            nums.append(x)
        x = torch.stack(nums)
        q_dmt = bh_qvalues(ratio_p(x, den.expand_as(x), th.tau, alternative="greater").float())
    return [
        compensation(h, tested[i], dmt[i], float(q_dmt[i]), th) for i, h in enumerate(heads)
    ]


def carriers(
    edge_est: list[Estimate], names: list[str], e_h: Estimate, th: Thresholds
) -> str:
    """Sources whose single-edge removal carries at least half of the head's effect; only for
    a head whose effect clears the null margin (a noise-level head has no carriers)."""
    if not (e_h.lo > th.delta or e_h.hi < -th.delta) or abs(e_h.value) < 1e-9:
        return ""
    return ",".join(
        n
        for n, e in zip(names, edge_est, strict=True)
        if math.isfinite(e.value) and e.value / e_h.value >= 0.5
    )
