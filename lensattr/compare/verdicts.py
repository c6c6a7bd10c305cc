"""The one definition of each verdict, applied to the numbers of one baseline.

Every number behind one verdict comes from one ablation baseline (zero, mean or resample):
the head's effect e, its routing ratio rho, the partner search and direct - total. The audit
decides under every baseline it computed; the label shown follows the primary baseline and the
others are reported beside it (``compensated_under``, ``labels_by_baseline``).

Two axes, then a label (``Thresholds`` holds every margin):

* **relevance** of the head's solo effect e:
  ``relevant`` when e's CI (at the FCR level of the heads BH selects) lies outside
  [-delta, delta] and the BH q-value of the sign-flip test (across heads) is below alpha;
  ``null`` when the equivalence test |e| < delta (TOST, BH across heads) has q below alpha,
  with the CI inside [-delta, delta]; ``unclear`` otherwise (also when there are too few
  prompts for either test to reach alpha).
* **routing** rho = (m(keep only C) - m(ablated)) / (m0 - m(ablated)), keep-only and ablation
  under the same baseline, C the claimed set. Keep-only removes every source outside C *and the
  sink's terms*, so rho measures C alone. Two more shares of the head's effect, each a ratio of
  means with its CI: the sink share sigma = (m(sink terms removed) - m0) / (m(ablated) - m0) and
  the necessity nu = (m(C removed) - m0) / (m(ablated) - m0). Classes: ``through_sink`` when
  sigma's CI lies above 0.5 (most of the effect, CI-backed, travels through the sink's terms);
  ``through_claim`` when rho's CI lies inside [0.7, 1.3] *and* nu's CI lies above 0.5 (C is
  sufficient and necessary); ``redundant`` when rho's CI is inside the band but nu's CI lies
  below 0.5 (C suffices, but removing it leaves the effect: other sources back it up);
  ``elsewhere`` when rho's CI lies below 0.3; ``partial`` when it lies clear of both bands and
  their edges; ``unclear`` when a CI straddles an edge; ``n/a`` when undefined (the head is
  not relevant: nothing to route). Intervals of selected (relevant) heads are false-coverage-
  rate intervals (Benjamini-Yekutieli: level 1 - alpha * R / m for R relevant of m heads).

Labels, in precedence order:

1. ``compensated``: the solo effect is small (CI inside (-tau, tau)), and either a partner h'
   whose joint ablation has |e(h, h')| >= tau (CI) with an interaction
   e(h, h') - e(h) - e(h') beyond delta in the joint effect's direction (CI, and BH q < alpha;
   the partner is the candidate with the largest significant interaction), or the sign-aware
   direct - total effect s * (e_direct - e_total) > tau (CI, and BH q < alpha), s = sign of the
   direct effect.
2. ``through_sink`` (relevant, through_sink), ``faithful`` (relevant, through_claim),
   ``misleading`` (relevant, elsewhere), ``partial`` (relevant, partial routing).
3. ``inert``: null (e's FCR interval inside [-delta, delta] for heads selected by TOST), and
   a striking pattern (type score >= 0.5, over every query or at the read position).
   ``negligible``: null, no striking pattern.
4. ``undetermined``: anything else; the reason says which number kept the verdict open.

``diffuse`` is a claim-side flag reported beside the label, not a label.
"""

from __future__ import annotations

import math
from typing import TypeGuard

import torch
from torch import Tensor

from ..core.types import HeadId
from ..stats.inference import Estimate
from .records import Compensation, HeadEvidence, Thresholds, Verdict

__all__ = [
    "Thresholds",
    "Compensation",
    "HeadEvidence",
    "Verdict",
    "relevance",
    "routing_class",
    "LABEL_CLASS",
    "interpretive_change",
    "decide",
    "VERDICTS",
]

VERDICTS = (
    "compensated",
    "through_sink",
    "faithful",
    "misleading",
    "partial",
    "inert",
    "negligible",
    "undetermined",
)

# The claim each label makes about the head; a head whose labels under two baselines make
# different claims is flagged (``undetermined`` makes none, so it never causes a flag).
LABEL_CLASS = {
    "compensated": "compensated",  # it matters, through a partner or downstream cancellation
    "through_sink": "through_sink",
    "faithful": "through_claim",
    "misleading": "elsewhere",
    "partial": "partial",
    "inert": "null",
    "negligible": "null",
    "undetermined": None,
}


def interpretive_change(labels) -> bool:
    """Do ``labels`` (one per baseline) make different claims: relevant vs null, or
    different routing classes? ``inert`` vs ``negligible`` (both null) and anything vs
    ``undetermined`` (no claim) are not a change."""
    return len({LABEL_CLASS.get(x) for x in labels} - {None}) > 1


def relevance(e: Estimate, q: float, q_null: float, th: Thresholds,
              e_null: Estimate | None = None) -> str:
    """``e_null``: e's interval at the null selection's FCR level (default e's own)."""
    if not all(math.isfinite(x) for x in (e.value, e.lo, e.hi)):
        return "unclear"
    if e.lo > th.delta or e.hi < -th.delta:
        return "relevant" if q < th.alpha else "unclear"
    n = e if e_null is None else e_null
    inside = n.lo >= -th.delta and n.hi <= th.delta
    if inside and e.lo >= -th.delta and e.hi <= th.delta and (
            math.isnan(q_null) or q_null < th.alpha):
        return "null"
    return "unclear"


def _finite(e: Estimate | None) -> TypeGuard[Estimate]:
    return e is not None and all(math.isfinite(x) for x in (e.value, e.lo, e.hi))


def _known(e: Estimate | None) -> Estimate:
    """An estimate the rule that fired has already shown to be there."""
    assert e is not None
    return e


def routing_class(rho: Estimate, th: Thresholds, sink: Estimate | None = None,
                  necessity: Estimate | None = None) -> str:
    """Where the head's effect flows (see the module docstring). Without ``necessity`` (not
    measured) the claim cannot be shown necessary, so ``through_claim`` needs it."""
    if _finite(sink) and sink.lo > th.sink_carried:
        return "through_sink"
    if not _finite(rho):
        return "n/a"
    if th.faithful_lo <= rho.lo and rho.hi <= th.faithful_hi:
        if not _finite(necessity):
            return "unclear"
        nec = _known(necessity)
        if nec.lo > th.necessary:
            return "through_claim"
        return "redundant" if nec.hi < th.necessary else "unclear"
    if rho.hi < th.misleading_hi:
        return "elsewhere"
    edges = (th.misleading_hi, th.faithful_lo, th.faithful_hi)
    if any(rho.lo <= x <= rho.hi for x in edges):
        return "unclear"
    return "partial"


def _ci(e: Estimate, level: float = 0.95) -> str:
    return f"{e.value:.3f} ({100 * level:.3g}% CI [{e.lo:.3f}, {e.hi:.3f}])"


def _small(e: Estimate, th: Thresholds) -> bool:
    """Two-sided: the solo effect's CI lies inside (-tau, tau)."""
    return math.isfinite(e.lo) and math.isfinite(e.hi) and -th.tau < e.lo and e.hi < th.tau


def _partner_fires(c: Compensation, th: Thresholds) -> bool:
    j, i = c.joint, c.interaction
    if c.partner is None or j is None or i is None or not math.isfinite(j.value):
        return False
    s = 1.0 if j.value >= 0 else -1.0
    big = j.lo >= th.tau if s > 0 else j.hi <= -th.tau
    inter = (i.lo > th.delta) if s > 0 else (i.hi < -th.delta)
    return big and inter and c.q_interaction < th.alpha


def _dmt_fires(c: Compensation, th: Thresholds) -> bool:
    d = c.direct_minus_total
    return d is not None and math.isfinite(d.lo) and d.lo > th.tau and c.q_dmt < th.alpha


def decide(ev: HeadEvidence, th: Thresholds) -> Verdict:
    """Apply the rules above to one head's evidence under one baseline."""
    e, rho, c, b = ev.effect, ev.routing, ev.compensation, ev.baseline
    sink, nec = ev.sink, ev.necessity
    rel = relevance(e, ev.q, ev.q_null, th, ev.effect_null)
    rout = routing_class(rho, th, sink, nec)
    x, ce = e.per_prompt, _ci(e, ev.effect_level)
    nan_est = Estimate.nan(len(x))
    sk, nc = sink or nan_est, nec or nan_est
    nums = {"effect": e.value, "effect_lo": e.lo, "effect_hi": e.hi, "q": ev.q,
            "q_null": ev.q_null, "routing": rho.value, "routing_lo": rho.lo,
            "routing_hi": rho.hi, "sink_share": sk.value, "sink_share_lo": sk.lo,
            "sink_share_hi": sk.hi, "necessity": nc.value, "necessity_lo": nc.lo,
            "necessity_hi": nc.hi, "interval_level": ev.level}  # fmt: skip

    def out(label, rule, reason, holds, partner=None, **extra):
        return Verdict(label, rule, rel, rout, b, reason, {**nums, **extra}, holds, partner)

    nan = torch.full_like(x, math.nan)
    if ev.too_few is not None:
        return out("undetermined", "too_few_prompts", ev.too_few, nan)
    if _small(e, th) and _partner_fires(c, th):
        j, i, p = _known(c.joint), _known(c.interaction), c.partner
        assert p is not None
        s = 1.0 if j.value >= 0 else -1.0
        holds = (x.abs() < th.tau) & (s * j.per_prompt >= th.tau) & (s * i.per_prompt > th.delta)
        why = (f"Alone, {b}-ablating the head moves the metric by only {ce}, but ablating "
               f"it together with {HeadId(*p)} moves it by {_ci(j)}; the interaction "
               f"{_ci(i)} (q = {c.q_interaction:.3g}) says {HeadId(*p)} takes over when this "
               "head is gone.")  # fmt: skip
        return out("compensated", "compensated_by_partner", why, holds.float(), HeadId(*p),
                   joint=j.value, interaction=i.value, q_interaction=c.q_interaction)
    if _small(e, th) and _dmt_fires(c, th):
        d = _known(c.direct_minus_total)
        why = (f"The head's direct effect on the readout exceeds its total effect by {_ci(d)} "
               f"(q = {c.q_dmt:.3g}) under {b} ablation: downstream components compensate "
               "for its removal.")  # fmt: skip
        return out("compensated", "compensated_direct_gt_total", why,
                   (d.per_prompt > th.tau).float(), direct_minus_total=d.value, q_dmt=c.q_dmt)
    if rel == "relevant":
        return _routed(ev, th, out, nan)
    if rel == "null":
        eq = "" if math.isnan(ev.q_null) else f", equivalence q = {ev.q_null:.3g}"
        small = (x.abs() <= th.delta).float()
        if ev.striking:
            why = (f"{b.capitalize()}-ablating the head moves the metric by {ce}, inside the "
                   f"null margin ±{th.delta}{eq}, although its attention pattern is striking: "
                   "the pattern does nothing for this metric.")
            return out("inert", "inert", why, small)
        why = (f"{b.capitalize()}-ablating the head moves the metric by {ce}, inside the "
               f"null margin ±{th.delta}{eq}, and its pattern is not striking.")
        return out("negligible", "negligible", why, small)
    if not math.isfinite(e.value):
        why = (f"The head's {b} effect could not be computed (the reference run does not move "
               "the metric, or every prompt was undefined).")
        return out("undetermined", "effect_undefined", why, nan)
    if not (math.isfinite(e.lo) and math.isfinite(e.hi)):
        why = (f"The {b} effect {e.value:.3f} has an unbounded interval: the reference run "
               "does not move the metric significantly on these prompts, so no effect can be "
               "normalised by it; use prompts whose corruption changes the metric.")
        return out("undetermined", "reference_not_significant", why, nan)
    if e.lo > th.delta or e.hi < -th.delta:
        why = (f"The {b} effect {ce} clears the null margin but is not significant after "
               f"correction across heads (q = {ev.q:.3g} >= {th.alpha}): more prompts would "
               "decide.")
        return out("undetermined", "not_significant", why, nan)
    if e.lo >= -th.delta and e.hi <= th.delta:
        why = (f"The {b} effect {ce} lies inside the null margin ±{th.delta}, but the "
               f"equivalence test is not significant after correction (q = {ev.q_null:.3g}): "
               "more prompts would decide.")
        return out("undetermined", "equivalence_not_significant", why, nan)
    why = (f"The {b} effect {ce} straddles the null margin ±{th.delta}: more prompts would "
           "decide whether the head matters.")
    return out("undetermined", "effect_straddles", why, nan)


def _routed(ev: HeadEvidence, th: Thresholds, out, nan: Tensor) -> Verdict:
    """The label of a relevant head: where its effect flows (through the sink, the claim,
    elsewhere, partly), from rho, the sink share and the necessity of C."""
    e, rho, b, lv = ev.effect, ev.routing, ev.baseline, ev.level
    rout = routing_class(rho, th, ev.sink, ev.necessity)
    x, r = e.per_prompt, rho.per_prompt
    big = x.abs() > th.delta
    head = (f"{b.capitalize()}-ablating the head moves the metric by "
            f"{_ci(e, ev.effect_level)} (q = {ev.q:.3g})")
    fcr = "" if lv == 0.95 else f" (false-coverage-rate level {lv:.4g} for the selected heads)"
    sink_txt = "" if not _finite(ev.sink) else (
        f"; the sink's terms carry {_ci(ev.sink, lv)} of it")
    if rout == "through_sink":
        sg = _known(ev.sink)
        why = (f"{head}, and removing only the terms of the sink (BOS) it attends moves the "
               f"metric by {_ci(sg, lv)} of that effect{fcr}: the effect travels through "
               f"its attention to the sink, not through its claimed sources (keeping only them "
               f"keeps {_ci(rho, lv)}).")
        return out("through_sink", "through_sink", why,
                   _defined(big & (sg.per_prompt > th.sink_carried), x, sg.per_prompt))
    if rout == "through_claim":
        nu = _known(ev.necessity)
        why = (f"{head}; keeping only its claimed sources (sink removed too) keeps "
               f"{_ci(rho, lv)} of that effect and removing them takes away "
               f"{_ci(nu, lv)}{fcr}: its attention map's claim carries the effect{sink_txt}.")
        holds = (big & (r >= th.faithful_lo) & (r <= th.faithful_hi)
                 & (nu.per_prompt > th.necessary))
        return out("faithful", "faithful", why, _defined(holds, x, r + nu.per_prompt))
    if rout == "redundant":
        nu = _known(ev.necessity)
        why = (f"{head}; keeping only its claimed sources keeps {_ci(rho, lv)} of it, but "
               f"removing them takes away only {_ci(nu, lv)}{fcr}: the claim suffices but "
               "is not necessary (other sources back it up), so the map neither is nor is "
               "not the route.")
        return out("undetermined", "claim_not_necessary", why, nan)
    if rout == "elsewhere":
        why = (f"{head}, but keeping only its claimed sources keeps just {_ci(rho, lv)} of "
               f"it{fcr}: the effect flows through sources its attention map does not "
               f"claim{sink_txt}.")
        return out("misleading", "misleading", why, _defined(big & (r < th.misleading_hi), x, r))
    if rout == "partial":
        why = (f"{head}; keeping only its claimed sources keeps {_ci(rho, lv)} of it{fcr}, "
               f"between the misleading and faithful bands: the claim carries part of the "
               f"effect{sink_txt}.")
        holds = big & (r >= th.misleading_hi) & ((r < th.faithful_lo) | (r > th.faithful_hi))
        return out("partial", "partial", why, _defined(holds, x, r))
    if rout == "n/a":
        why = (f"{head}, but its routing ratio could not be measured (the keep-only edit "
               "or its reference is undefined on these prompts).")
        return out("undetermined", "routing_undefined", why, nan)
    measured = ev.necessity
    nec = f", necessity {_ci(measured, lv)}" if _finite(measured) else ""
    why = (f"{head}, but an interval straddles a band edge (routing {_ci(rho, lv)}{nec}"
           f"{sink_txt}; bands {th.misleading_hi}, {th.faithful_lo}-{th.faithful_hi}, "
           f"necessity and sink share {th.necessary}){fcr}: more prompts would decide whether "
           "the claim carries the effect.")
    return out("undetermined", "routing_straddles", why, nan)


def _defined(holds: Tensor, x: Tensor, r: Tensor) -> Tensor:
    ok = torch.isfinite(x) & torch.isfinite(r)
    return torch.where(ok, holds.float(), torch.full_like(x, math.nan))
