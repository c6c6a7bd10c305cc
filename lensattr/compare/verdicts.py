"""The one definition of each verdict.

Two axes, then a label (``Thresholds`` holds every margin):

* **relevance** of the head's solo effect e (primary ablation):
  ``relevant`` when e's 95% CI lies outside [-delta, delta] and the BH q-value < alpha;
  ``null`` when the CI lies inside [-delta, delta] (an equivalence test, not "not significant");
  ``unclear`` otherwise.
* **routing** rho = (m(keep only C) - m(zero head)) / (m0 - m(zero head)):
  ``through_claim`` when rho's CI lies inside [0.7, 1.3]; ``elsewhere`` when its CI lies below
  0.3; ``partial`` when the CI lies in neither band nor straddles a band edge; ``unclear`` when
  it straddles; ``n/a`` when undefined (zero-ablating the head moves the metric by less than
  delta: nothing to route).

Labels, in precedence order:

1. ``compensated``: solo effect null or below tau (CI upper < tau), and either a partner h' with
   joint effect e(h, h') >= tau (CI lower) and a positive interaction
   e(h, h') - e(h) - e(h') > delta (CI lower), or direct effect - total effect > tau (CI lower).
2. ``faithful`` (relevant, through_claim), ``misleading`` (relevant, elsewhere),
   ``partial`` (relevant, partial routing).
3. ``inert``: null, and a striking pattern (type score >= 0.5).
   ``negligible``: null, no striking pattern (nothing claimed, nothing done).
4. ``undetermined``: anything else (a CI straddles a threshold).

``diffuse`` is a claim-side flag reported beside the label, not a label.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .stats import Estimate

__all__ = ["Thresholds", "relevance", "routing_class", "decide", "prompt_holds", "VERDICTS"]

VERDICTS = (
    "compensated",
    "faithful",
    "misleading",
    "partial",
    "inert",
    "negligible",
    "undetermined",
)


@dataclass(frozen=True)
class Thresholds:
    delta: float = 0.03  # equivalence margin for "no effect"
    tau: float = 0.10  # "large" effect
    alpha: float = 0.05  # BH level
    faithful_lo: float = 0.7
    faithful_hi: float = 1.3
    misleading_hi: float = 0.3
    striking: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


def relevance(e: Estimate, q: float, th: Thresholds) -> str:
    if math.isnan(e.value):
        return "unclear"
    if e.lo > th.delta or e.hi < -th.delta:
        return "relevant" if q < th.alpha else "unclear"
    if e.lo >= -th.delta and e.hi <= th.delta:
        return "null"
    return "unclear"


def routing_class(rho: Estimate, th: Thresholds) -> str:
    if math.isnan(rho.value) or math.isnan(rho.lo):
        return "n/a"
    if th.faithful_lo <= rho.lo and rho.hi <= th.faithful_hi:
        return "through_claim"
    if rho.hi < th.misleading_hi:
        return "elsewhere"
    edges = (th.misleading_hi, th.faithful_lo, th.faithful_hi)
    if any(rho.lo < x < rho.hi for x in edges):
        return "unclear"
    return "partial"


@dataclass(frozen=True)
class Compensation:
    """Evidence that a head is compensated: by a partner, or by direct > total."""

    partner: tuple[int, int] | None
    joint: Estimate | None
    interaction: Estimate | None
    direct_minus_total: Estimate | None


def is_compensated(e: Estimate, rel: str, comp: Compensation | None, th: Thresholds) -> str | None:
    """Reason string when the head is compensated, else None."""
    if comp is None or not (rel == "null" or e.hi < th.tau):
        return None
    if comp.joint is not None and comp.interaction is not None:
        if comp.joint.lo >= th.tau and comp.interaction.lo > th.delta:
            return (
                f"solo effect {e.value:.3f} but {comp.joint.value:.3f} together with partner "
                f"(interaction {comp.interaction.value:.3f})"
            )
    d = comp.direct_minus_total
    if d is not None and not math.isnan(d.lo) and d.lo > th.tau:
        return f"direct effect exceeds total effect by {d.value:.3f}"
    return None


def decide(
    e: Estimate, q: float, rho: Estimate, striking: bool, comp: Compensation | None, th: Thresholds
) -> tuple[str, str, str, str]:
    """Return (verdict, relevance, routing, reason)."""
    rel, rout = relevance(e, q, th), routing_class(rho, th)
    why = is_compensated(e, rel, comp, th)
    if why is not None:
        return "compensated", rel, rout, why
    if rel == "relevant":
        label = {"through_claim": "faithful", "elsewhere": "misleading", "partial": "partial"}.get(
            rout
        )
        if label is not None:
            return label, rel, rout, f"effect {e.value:.3f}, routing {rho.value:.3f}"
        return "undetermined", rel, rout, f"relevant, but routing CI [{rho.lo:.2f}, {rho.hi:.2f}]"
    if rel == "null":
        if striking:
            return "inert", rel, rout, "striking pattern, effect within the null margin"
        return "negligible", rel, rout, "no striking pattern, effect within the null margin"
    if e.lo > th.delta or e.hi < -th.delta:
        why = f"effect CI clears the margin but q = {q:.3f} >= {th.alpha}"
        return "undetermined", rel, rout, why
    return "undetermined", rel, rout, f"effect CI [{e.lo:.3f}, {e.hi:.3f}] straddles a margin"


def prompt_holds(
    verdict: str,
    e: torch.Tensor,
    rho: torch.Tensor,
    comp: Compensation | None,
    partner_e: torch.Tensor | None,
    th: Thresholds,
) -> torch.Tensor:
    """Per prompt, does the verdict's rule hold on that prompt's own values? (NaN = undefined)"""
    big = e.abs() > th.delta
    small = e.abs() <= th.delta
    nan = torch.full_like(e, float("nan"))
    if verdict == "faithful":
        out = big & (rho >= th.faithful_lo) & (rho <= th.faithful_hi)
    elif verdict == "misleading":
        out = big & (rho < th.misleading_hi)
    elif verdict == "partial":
        out = big & (rho >= th.misleading_hi) & ((rho < th.faithful_lo) | (rho > th.faithful_hi))
    elif verdict in ("inert", "negligible"):
        out = small
    elif verdict == "compensated" and comp is not None:
        if comp.joint is not None and partner_e is not None:
            j = comp.joint.per_prompt
            out = (e < th.tau) & (j >= th.tau) & ((j - e - partner_e) > th.delta)
        elif comp.direct_minus_total is not None:
            out = comp.direct_minus_total.per_prompt > th.tau
        else:
            return nan
    else:
        return nan
    defined = torch.isfinite(e)
    if verdict in ("faithful", "misleading", "partial"):
        defined &= torch.isfinite(rho)
    return torch.where(defined, out.float(), nan)
