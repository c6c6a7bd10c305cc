"""The verdict rules on hand-made evidence (issue 12, items 2, 3 and 6)."""

import math

import pytest
import torch

from lensattr.compare.compensation import best_partner, candidate_partners
from lensattr.compare.judge import carriers
from lensattr.compare.verdicts import (
    Compensation,
    HeadEvidence,
    Thresholds,
    Verdict,
    decide,
    routing_class,
)
from lensattr.core.types import HeadId
from lensattr.stats.inference import Estimate, min_prompts

TH = Thresholds()
NAN = Estimate(math.nan, math.nan, math.nan, torch.full((4,), math.nan))


def est(v, lo, hi, per=None):
    return Estimate(v, lo, hi, torch.full((4,), float(v)) if per is None else torch.tensor(per))


def ev(e, rho=NAN, q=0.001, q_null=0.001, striking=False, comp=None, too_few=None,
       sink=None, nec=None):
    # removing C takes the whole effect away unless a test says otherwise (faithful needs it)
    nec = est(1.0, 0.9, 1.1) if nec is None else nec
    return HeadEvidence(HeadId(0, 0), "resample", e, q, q_null, rho, striking,
                        comp or Compensation(), too_few, sink=sink, necessity=nec)


BIG, NULL = est(0.3, 0.25, 0.35), est(0.0, -0.01, 0.01)


def test_relevant_routing_labels():
    assert decide(ev(BIG, est(1.0, 0.9, 1.1)), TH).label == "faithful"
    assert decide(ev(BIG, est(0.1, 0.0, 0.2)), TH).label == "misleading"
    assert decide(ev(BIG, est(0.5, 0.4, 0.6)), TH).label == "partial"
    v = decide(ev(BIG, est(0.8, 0.5, 1.0)), TH)
    assert v.label == "undetermined" and v.rule == "routing_straddles"
    assert decide(ev(BIG, est(1.0, 0.9, 1.1), q=0.2), TH).rule == "not_significant"
    assert routing_class(est(0.25, 0.2, 0.35), TH) == "unclear"


def test_null_needs_the_equivalence_test():
    assert decide(ev(NULL, striking=True), TH).label == "inert"
    assert decide(ev(NULL), TH).label == "negligible"
    v = decide(ev(NULL, q_null=0.2), TH)  # CI inside the margin, TOST not significant
    assert v.label == "undetermined" and v.rule == "equivalence_not_significant"
    assert decide(ev(est(0.03, 0.01, 0.05), striking=True), TH).rule == "effect_straddles"


def test_verdict_is_a_record_with_rule_numbers_and_sentence():
    v = decide(ev(BIG, est(1.0, 0.9, 1.1)), TH)
    assert isinstance(v, Verdict) and v.rule == "faithful"
    assert v.numbers["effect"] == pytest.approx(0.3) and v.numbers["routing"] == 1.0
    assert v.reason.endswith(".") and "nan" not in v.reason
    for e, rho in ((BIG, NAN), (NAN, NAN), (est(0.03, 0.01, 0.05), NAN)):
        r = decide(ev(e, rho), TH).reason
        assert "nan" not in r.lower() and r.endswith("."), r


def _pair(joint, inter, q, partner=(1, 2)):
    return Compensation(HeadId(*partner), joint, inter, q)


def test_compensation_needs_a_small_solo_effect_two_sided():
    comp = _pair(est(0.5, 0.45, 0.55), est(0.4, 0.35, 0.45), 0.001)
    assert decide(ev(NULL, comp=comp), TH).label == "compensated"
    assert decide(ev(est(0.05, 0.04, 0.06), comp=comp), TH).label == "compensated"
    strong_negative = est(-0.4, -0.45, -0.35)  # today's bug: e = -0.4 came out compensated
    assert decide(ev(strong_negative, est(1, 0.9, 1.1), comp=comp), TH).label != "compensated"


def test_compensation_needs_significance():
    comp = _pair(est(0.5, 0.45, 0.55), est(0.4, 0.35, 0.45), 0.2)
    assert decide(ev(NULL, comp=comp), TH).label != "compensated"
    comp = Compensation(direct_minus_total=est(0.3, 0.2, 0.4), q_dmt=0.2)
    assert decide(ev(NULL, comp=comp), TH).label != "compensated"
    comp = Compensation(direct_minus_total=est(0.3, 0.2, 0.4), q_dmt=0.01)
    v = decide(ev(NULL, comp=comp), TH)
    assert v.label == "compensated" and v.rule == "compensated_direct_gt_total"


def test_negative_pair_compensates_in_its_own_direction():
    comp = _pair(est(-0.5, -0.55, -0.45), est(-0.4, -0.45, -0.35), 0.001)
    assert decide(ev(NULL, comp=comp), TH).label == "compensated"
    wrong_way = _pair(est(-0.5, -0.55, -0.45), est(0.4, 0.35, 0.45), 0.001)
    assert decide(ev(NULL, comp=wrong_way), TH).label != "compensated"


def test_partner_is_the_largest_significant_interaction():
    a, b, c = HeadId(1, 0), HeadId(1, 1), HeadId(0, 3)
    tested = {
        a: (est(0.9, 0.8, 1.0), est(0.2, 0.15, 0.25), 0.01),  # largest joint effect
        b: (est(0.5, 0.4, 0.6), est(0.45, 0.4, 0.5), 0.01),  # largest interaction
        c: (est(0.5, 0.4, 0.6), est(0.6, 0.1, 1.1), 0.3),  # larger but not significant
    }
    assert best_partner(HeadId(0, 0), tested, TH)[0] == b


def test_verdict_share_tests_the_fired_rule():
    per_e = [0.0, 0.0, 0.0, 0.0]
    j, i = est(0.5, 0.45, 0.55, [0.5, 0.5, 0.5, 0.0]), est(0.4, 0.35, 0.45, [0.4, 0.4, 0.4, 0.0])
    v = decide(ev(est(0.0, -0.01, 0.01, per_e), comp=_pair(j, i, 0.001)), TH)
    assert v.rule == "compensated_by_partner" and v.share == pytest.approx(0.75)
    d = est(0.3, 0.2, 0.4, [0.3, 0.3, 0.0, 0.0])
    comp = Compensation(direct_minus_total=d, q_dmt=0.01)
    v = decide(ev(est(0.0, -0.01, 0.01, per_e), comp=comp), TH)
    assert v.rule == "compensated_direct_gt_total" and v.share == pytest.approx(0.5)


def test_too_few_prompts_is_undetermined_never_confident():
    v = decide(ev(NULL, striking=True, too_few="Too few prompts: need 9."), TH)
    assert v.label == "undetermined" and v.rule == "too_few_prompts"
    assert math.isnan(v.share)


def test_min_prompts():
    # a lone relevant head passes BH over m heads only when 2 / 2**n * m < alpha
    assert min_prompts(1, 0.05) == 6  # 2/64 = 0.031
    assert min_prompts(12, 0.05) == 9  # 2/512 * 12 = 0.047
    assert min_prompts(270, 0.05) == 14
    for m in (1, 12, 270):
        n = min_prompts(m, 0.05)
        assert 2 / 2**n * m < 0.05 <= 2 / 2 ** (n - 1) * m


def test_carriers_only_for_heads_outside_the_null_margin():
    edges = [est(0.0, -0.01, 0.01), est(0.0001, 0.0, 0.0002)]
    noise = est(0.0001, -0.01, 0.01)
    assert carriers(edges, ["BOS", "S1"], noise, TH) == ""
    assert carriers([est(0.0, 0, 0), est(0.3, 0.25, 0.35)], ["BOS", "S1"], BIG, TH) == "S1"


def test_same_layer_heads_can_be_partners():
    """Two heads of one layer cannot respond to each other, but write the same direction:
    they are candidates for each other (redundant writers)."""
    heads = [HeadId(0, 0), HeadId(0, 1), HeadId(0, 2)]
    out = torch.zeros(5, 1, 3, 4)  # [batch, layer, head, d_model]
    out[:, 0, 0, 0] = 1.0
    out[:, 0, 1, 0] = 0.8  # same direction as head 0
    out[:, 0, 2, 3] = 1.0  # orthogonal
    delta = torch.zeros(3, 1, 3)  # no head's output changes when another is ablated
    cands = candidate_partners(delta, out, heads)
    assert cands[heads[0]] == [heads[1]] and cands[heads[1]] == [heads[0]]
    assert cands[heads[2]] == []


def test_unbounded_interval_says_the_reference_is_the_problem():
    e = Estimate(0.2, -math.inf, math.inf, torch.full((4,), 0.2))
    v = decide(ev(e), TH)
    assert v.label == "undetermined" and v.rule == "reference_not_significant"
    assert "reference run does not move the metric" in v.reason
