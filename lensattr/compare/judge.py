"""From per-prompt metric values to verdicts: effects, routing, compensation and carriers.

Everything is computed per baseline from the evidence of that baseline only (keyed by
:class:`~lensattr.evidence.keys.EvidenceKey`, see :mod:`lensattr.evidence.sweeps`), and the verdict
rules of :mod:`lensattr.compare.verdicts` are applied under each. The orchestration
(:func:`lensattr.audit`) only runs the interventions and hands the values over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.types import AblationMethod, HeadId
from ..evidence.keys import EvidenceKey, Kind, key
from ..stats.inference import Estimate, bh_qvalues, min_prompts, ratio_of_means, signflip_p
from ..stats.ratio import ratio_p, tost_p
from ..stats.selection import fcr_level
from .compensation import compensation
from .verdicts import Compensation, HeadEvidence, Thresholds, Verdict, decide, relevance

__all__ = ["Effects", "judge", "Judgement", "carriers", "min_prompts"]  # min_prompts: re-export


class Effects:
    """Normalised effects e = mean(m_int - m0) / mean(m_ref - m0) with Fieller 95% intervals,
    by evidence key (:class:`~lensattr.evidence.keys.EvidenceKey`), cached.

    ``eff(k)`` needs evidence ``k`` to have run (a ``KeyError`` naming it otherwise);
    ``eff.get(k)`` gives a NaN estimate for evidence that was not planned (a screened-out
    head). Both refuse anything but a key, so a mistyped name is an error, not a NaN column."""

    def __init__(self, values: dict[EvidenceKey, Tensor], m0: Tensor, den: Tensor,
                 seed: int = 0):
        self.values, self.m0, self.den = values, m0, den
        self.seed = seed
        self._cache: dict[EvidenceKey, Estimate] = {}

    def __contains__(self, k: EvidenceKey) -> bool:
        return _checked(k) in self.values

    def __call__(self, k: EvidenceKey) -> Estimate:
        if _checked(k) not in self._cache:
            if k not in self.values:
                raise KeyError(f"evidence {k} was not measured")
            self._cache[k] = self.ratio(self.values[k] - self.m0, k)
        return self._cache[k]

    def get(self, k: EvidenceKey) -> Estimate:
        return self(k) if _checked(k) in self.values else Estimate.nan(len(self.m0))

    def ratio(self, num: Tensor, k: EvidenceKey, den: Tensor | None = None,
              level: float = 0.95) -> Estimate:
        d = self.den if den is None else den
        return _one(ratio_of_means(num, d, label=str(k), level=level))


def _one(e) -> Estimate:
    """The Estimate of a [batch] ratio (ratio_of_means gives a list for [cells, batch])."""
    assert isinstance(e, Estimate)
    return e


def _checked(k) -> EvidenceKey:
    if not isinstance(k, EvidenceKey):
        raise TypeError(f"evidence key: expected an EvidenceKey (lensattr.evidence.keys.key), "
                        f"got {type(k).__name__} {k!r}")
    return k


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
    """Each head's evidence under baseline ``m``, with false-coverage-rate intervals
    (Benjamini & Yekutieli 2005: level 1 - alpha * R / m for R selected of the m heads BH
    tested) for selected heads: e of the heads BH selects (q < alpha), the routing, sink and
    necessity intervals of the relevant heads, and e's interval for the null check of the
    heads the equivalence test selects. Other heads keep marginal 95% intervals. FCR bounds
    the expected share of selected heads whose interval misses, not false labels per label
    (``experiments/fcr_simulation.py``)."""
    b, v, m0 = m.value, eff.values, eff.m0
    solo = [key(Kind.ABLATE, h, baseline=b) for h in heads]
    e = [eff(k) for k in solo]
    num = torch.stack([v[k] - m0 for k in solo])  # [head, batch]
    p = signflip_p(num, seed=eff.seed)
    q = bh_qvalues(p)
    q_null = bh_qvalues(tost_p(num, eff.den.expand_as(num), th.delta).float())
    n_heads = len(heads)
    tested = int(torch.isfinite(p).sum())  # the family BH counted
    # e of the heads BH selects (q < alpha): its interval at their FCR level decides whether
    # it clears the null margin
    sel = [i for i in range(n_heads) if float(q[i]) < th.alpha]
    lv_e = fcr_level(th.alpha, len(sel), tested)
    for i in sel:
        e[i] = eff.ratio(num[i], solo[i], level=lv_e)
    rel = [relevance(e[i], float(q[i]), float(q_null[i]), th) for i in range(n_heads)]
    lv = fcr_level(th.alpha, sum(x == "relevant" for x in rel), tested)
    sel_null = [i for i in range(n_heads) if float(q_null[i]) < th.alpha]
    lv_null = fcr_level(th.alpha, len(sel_null), tested)
    e_null = {i: eff.ratio(num[i], solo[i], level=lv_null) for i in sel_null}
    shares = [_shares(eff, h, b, e_h, th, lv if rel[i] == "relevant" else 0.95)
              for i, (h, e_h) in enumerate(zip(heads, e, strict=True))]
    comps = _compensations(eff, heads, b, e, direct, th)
    ev = [
        HeadEvidence(h, b, e[i], float(q[i]), float(q_null[i]), shares[i][0],
                     bool(striking[h.layer, h.head]), comps[i], too_few, sink=shares[i][1],
                     necessity=shares[i][2], level=lv, effect_null=e_null.get(i),
                     effect_level=lv_e if i in sel else 0.95)
        for i, h in enumerate(heads)
    ]  # fmt: skip
    return ev, p


def _shares(eff: Effects, h: HeadId, b: str, e_h: Estimate, th: Thresholds, level: float
            ) -> tuple[Estimate, Estimate | None, Estimate | None]:
    """(rho, sink share, necessity) at ``level``, all under ``b`` (see
    :mod:`lensattr.compare.verdicts`): rho = mean(m(keep only C) - m(ablated)) /
    mean(m0 - m(ablated)); sink share = mean(m(sink removed) - m0) / mean(m(ablated) - m0);
    necessity = mean(m(C removed) - m0) / mean(m(ablated) - m0). NaN (None for the shares)
    unless the head's effect clears the null margin (nothing to route) or when not measured."""
    n = len(eff.m0)
    if not (e_h.lo > th.delta or e_h.hi < -th.delta):
        return Estimate.nan(n), None, None
    abl = eff.values[key(Kind.ABLATE, h, baseline=b)]
    v, m0 = eff.values, eff.m0
    keep, sink, rm = (key(k, h, baseline=b) for k in (Kind.KEEP, Kind.SINK, Kind.REMOVE))
    rho = (eff.ratio(v[keep] - abl, key(Kind.RHO, h, baseline=b), den=m0 - abl, level=level)
           if keep in v else Estimate.nan(n))
    share = (eff.ratio(v[sink] - m0, key(Kind.SINK_SHARE, h, baseline=b), den=abl - m0,
                       level=level) if sink in v else None)
    nec = (eff.ratio(v[rm] - m0, key(Kind.NECESSITY, h, baseline=b), den=abl - m0,
                     level=level) if rm in v else None)
    return rho, share, nec


def _compensations(eff, heads, b, e, direct, th) -> list[Compensation]:
    """Partners by joint ablation, and the sign-aware direct - total effect
    s * (m(direct-<b>) - m(<b>)) / den. The same direct - total, per prompt in metric units,
    is ``lensattr.evidence.compensators(...).direct_minus_total``, which also names the heads
    whose direct effects make up the difference."""
    v, m0, den = eff.values, eff.m0, eff.den
    tests = []  # (head index, partner, joint, interaction num, sign)
    for i, h in enumerate(heads):
        for c in heads:
            if c == h:
                continue
            lbl = key(Kind.JOINT, *sorted((h, c)), baseline=b)
            if lbl not in v:
                continue
            inter = v[lbl] - v[key(Kind.ABLATE, h, baseline=b)] - v[key(Kind.ABLATE, c,
                                                                       baseline=b)] + m0
            tests.append((i, c, eff(lbl), inter, 1.0 if eff(lbl).value >= 0 else -1.0))
    q_int = torch.empty(0)
    if tests:
        nums = torch.stack([s * x for *_, x, s in tests])
        p = ratio_p(nums, den.expand_as(nums), th.delta, alternative="greater").float()
        q_int = bh_qvalues(p)
    tested: list[dict] = [{} for _ in heads]
    for k, (i, c, joint, inter, _) in enumerate(tests):
        tested[i][c] = (joint, eff.ratio(inter, key(Kind.INTERACTION, heads[i], c, baseline=b)),
                        float(q_int[k]))
    dmt: list[Estimate | None] = [None] * len(heads)
    q_dmt = torch.full((len(heads),), math.nan)
    if direct and all(key(Kind.DIRECT, h, baseline=b) in v for h in heads):
        dnums: list[Tensor] = []
        for i, h in enumerate(heads):
            kd = key(Kind.DIRECT, h, baseline=b)
            d = eff(kd)
            s = -1.0 if d.value < 0 else 1.0
            x = s * (v[kd] - v[key(Kind.ABLATE, h, baseline=b)])
            dmt[i] = eff.ratio(x, key(Kind.DIRECT_SHARE, h, baseline=b))
            dnums.append(x)
        x = torch.stack(dnums)
        q_dmt = bh_qvalues(ratio_p(x, den.expand_as(x), th.tau, alternative="greater").float())
    return [
        compensation(h, tested[i], dmt[i], float(q_dmt[i]), th) for i, h in enumerate(heads)
    ]


def carriers(
    edge_est: list[Estimate], names: list[str], e_h: Estimate, th: Thresholds
) -> str:
    """Sources whose single-edge removal carries at least half of the head's effect, tested:
    the ratio of means mean(m(edge removed) - m0) / mean(m(ablated) - m0) must have its
    Fieller interval above 0.5 at level 1 - alpha / k (Bonferroni over the k sources
    examined). Only for a head whose effect clears the null margin (a noise-level head has
    no carriers)."""
    if not (e_h.lo > th.delta or e_h.hi < -th.delta) or abs(e_h.value) < 1e-9:
        return ""
    k = max(1, sum(math.isfinite(e.value) for e in edge_est))
    out = []
    for n, e in zip(names, edge_est, strict=True):
        if not math.isfinite(e.value) or e.value / e_h.value < 0.5:
            continue
        share = _one(ratio_of_means(e.per_prompt, e_h.per_prompt, level=1 - th.alpha / k))
        if math.isfinite(share.lo) and share.lo > 0.5:
            out.append(n)
    return ",".join(out)
