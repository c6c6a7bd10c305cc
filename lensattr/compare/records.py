"""The comparison's records: the thresholds every rule reads (:class:`Thresholds`), one head's
evidence under one baseline (:class:`HeadEvidence`, with its :class:`Compensation` tests) and
the verdict a rule gives it (:class:`Verdict`: label, rule, numbers, per-prompt holds, the
sentence). The rules themselves are in :mod:`lensattr.compare.verdicts`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..core.types import HeadId
from ..stats.inference import Estimate

__all__ = ["Thresholds", "Compensation", "HeadEvidence", "Verdict"]


@dataclass(frozen=True)
class Thresholds:
    delta: float = 0.03  # equivalence margin for "no effect"
    tau: float = 0.10  # "large" effect
    alpha: float = 0.05  # BH level
    faithful_lo: float = 0.7
    faithful_hi: float = 1.3
    misleading_hi: float = 0.3
    striking: float = 0.5
    necessary: float = 0.5  # faithful: removing C takes away more than this share (CI)
    sink_carried: float = 0.5  # through_sink: the sink's terms carry more than this share (CI)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Compensation:
    """Evidence that a head is compensated, under one baseline.

    partner: the candidate with the largest significant interaction (None when none tested).
    joint: e(h, partner); interaction: e(h, partner) - e(h) - e(partner), per-prompt values on
    the common denominator; q_interaction: BH q of the one-sided test that the interaction lies
    beyond delta in the joint effect's direction. direct_minus_total: s * (e_direct - e_total),
    s = sign of the direct effect; q_dmt: BH q of the one-sided test that it exceeds tau.
    """

    partner: HeadId | None = None
    joint: Estimate | None = None
    interaction: Estimate | None = None
    q_interaction: float = math.nan
    direct_minus_total: Estimate | None = None
    q_dmt: float = math.nan


@dataclass(frozen=True)
class HeadEvidence:
    """The numbers behind one head's verdict, all under one baseline."""

    head: HeadId
    baseline: str
    effect: Estimate
    q: float  # BH q of the sign-flip test that e != 0
    q_null: float  # BH q of the equivalence test |e| < delta (NaN: not computed)
    routing: Estimate
    striking: bool
    compensation: Compensation = field(default_factory=Compensation)
    too_few: str | None = None  # why the prompts cannot support a verdict, if they cannot
    sink: Estimate | None = None  # share of the effect carried by the sink's terms
    necessity: Estimate | None = None  # share of the effect removed by removing C
    level: float = 0.95  # confidence level of routing, sink and necessity intervals (FCR)
    effect_null: Estimate | None = None  # e at the null selection's FCR level (None: e's own)
    effect_level: float = 0.95  # confidence level of ``effect``'s interval (FCR if selected)


@dataclass(frozen=True)
class Verdict:
    """A label with the rule that fired, the numbers it fired on and a reason in words.

    ``holds``: per prompt, does the fired rule hold on that prompt's own values (1/0; NaN where
    undefined). ``share`` is its mean over the prompts where it is defined.
    """

    label: str
    rule: str
    relevance: str
    routing_class: str
    baseline: str
    reason: str
    numbers: dict
    holds: Tensor
    partner: HeadId | None = None

    @property
    def share(self) -> float:
        ok = torch.isfinite(self.holds)
        return float(self.holds[ok].mean()) if ok.any() else math.nan

    @property
    def compensated(self) -> bool:
        return self.label == "compensated"

    @property
    def sentence(self) -> str:
        """The verdict in words (the rule's reason)."""
        return self.reason

    def to_dict(self) -> dict:
        """The record as JSON-able values (NaN and inf kept as floats)."""
        return {**{f: getattr(self, f) for f in _FIELDS}, "holds": self.holds.tolist(),
                "partner": list(self.partner) if self.partner is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        partner = HeadId(*d["partner"]) if d.get("partner") is not None else None
        return cls(**{f: d[f] for f in _FIELDS}, holds=torch.tensor(d["holds"]),
                   partner=partner)


_FIELDS = ("label", "rule", "relevance", "routing_class", "baseline", "reason", "numbers")
