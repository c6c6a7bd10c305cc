"""The audit on the bundled planted model gives every planted head its planted verdict."""

import json
import math

import pandas as pd
import pytest
import torch

import lensattr
from lensattr.compare.verdicts import interpretive_change
from lensattr.core.sites import Site, hook_name
from lensattr.models.zoo.planted import PLANTED_TRUTH

TRUTH = {(h["layer"], h["head"]): h for h in PLANTED_TRUTH["heads"]}
CLEAN = ("faithful", "decoy", "backup", "backup_constant")  # the heads that are on when clean
M0 = sum(PLANTED_TRUTH["contributions"][k] for k in CLEAN)  # clean logit diff, 16


@pytest.fixture(scope="module")
def model():
    return lensattr.load_model("planted")


@pytest.fixture(scope="module")
def result(model):
    return lensattr.audit(model, "planted-copy", progress=False)


def row(result, layer, head):
    h = result.heads
    r = h[(h["layer"] == layer) & (h["head"] == head)]
    assert len(r) == 1
    return r.iloc[0]


@pytest.mark.parametrize("lh", sorted(TRUTH))
def test_planted_verdict(result, lh):
    r, t = row(result, *lh), TRUTH[lh]
    assert r.verdict == t["verdict"], r.reason
    assert r.verdict_share == pytest.approx(1.0)
    if t["verdict"] == "compensated":
        assert (r.partner_layer, r.partner_head) == tuple(t["partner"])
    else:
        assert pd.isna(r.partner_layer) and r.partner == ""
    under = {x.split(":")[0]: x.split(":")[1] if ":" in x else None
             for x in r.compensated_under.split(",") if x}
    assert set(under) == set(t["compensated_under"]), r.compensated_under
    for partner in under.values():  # every baseline names the planted partner
        assert partner == str(lensattr.HeadId(*t["partner"]))
    by = dict(x.split("=") for x in r.labels_by_baseline.split(","))
    for b, label in t["verdict_by_baseline"].items():  # planted labels under other baselines
        assert by[b] == label, (b, r.labels_by_baseline)
    # flagged when the claim changes with the baseline (compensated under some, or a routing
    # class against null), not for inert vs negligible
    assert bool(r.baseline_sensitive) == interpretive_change(by.values())
    if 0 < len(under) < len(result.meta["ablation_methods"]):
        assert r.baseline_sensitive
    if t["head_type"] is not None:
        assert r.head_type == t["head_type"]
    if t["verdict"] in ("faithful", "misleading"):
        assert r.top_source == t["claimed_source_role"]
        assert t["carrier_role"] in r.carriers.split(",")
        assert r.head_type_read != "sink"  # its type at END is not its resting pattern
    else:
        assert r.carriers == ""  # no carriers for a head inside the null margin
    assert bool(r.diffuse) == t["diffuse"]


def test_constant_trigger_pair(result):
    """L0H4 / L1H4: resample and mean ablation keep L0H4's constant tag, so L1H4 never switches on
    under them; only zero ablation shows the pair (L0H4 alone 1/16, both together 4/16)."""
    p, q = row(result, 0, 4), row(result, 1, 4)
    assert p.ablation_resample == pytest.approx(4 / M0, abs=0.01)
    assert p.ablation_mean == pytest.approx(4 / M0, abs=0.01)
    assert p.ablation_zero == pytest.approx(1 / M0, abs=0.01)  # L1H4 restores 3 of 4
    assert p.direct_effect == pytest.approx(4 / M0, abs=0.01)
    for c in ("ablation_resample", "ablation_mean", "ablation_zero", "direct_effect"):
        assert abs(q[c]) < 0.01, c
    assert p.top_source == "S1" and q.head_type == "sink"
    # the label follows the primary (resample) baseline; zero ablation shows the pair
    assert (p.verdict, q.verdict) == ("faithful", "inert"), (p.reason, q.reason)
    assert p.labels_by_baseline == "zero=compensated,mean=faithful,resample=faithful"
    assert q.labels_by_baseline == "zero=compensated,mean=inert,resample=inert"
    assert p.compensated_under == "zero:L1H4" and q.compensated_under == "zero:L0H4"
    assert p.baseline_sensitive and q.baseline_sensitive


def test_report_flags_baseline_sensitive_heads(result, tmp_path):
    page = result.report(tmp_path / "r.html").read_text()
    # L0H4 and L1H4 (compensated under zero only), L0H5 (through_sink under zero only)
    assert page.count("label changes with the baseline") == 3


def test_renormalised_knockout_is_defined(result):
    """Edited only on the read rows the claim is about (no longer NaN for every head)."""
    for lh in ((0, 0), (0, 1), (0, 4)):
        assert math.isfinite(row(result, *lh).knockout_claimed_renorm)
    # L0H0 at END: S1 0.7, the rest 0.3 on BOS and fillers with zero value -> all of it goes
    assert row(result, 0, 0).knockout_claimed_renorm == pytest.approx(4 / M0, abs=0.01)


def test_axes_beside_labels(result):
    f, d = row(result, 0, 0), row(result, 0, 1)
    assert 0.7 <= f.routing_lo <= f.routing_hi <= 1.3
    assert d.routing_hi < 0.3
    # contributions 4 and 3 of a clean logit diff of 16, corrupted ~0: e = 1/4 and 3/16
    assert f.ablation_resample == pytest.approx(4 / M0, abs=0.01)
    assert d.ablation_resample == pytest.approx(3 / M0, abs=0.01)
    assert d.knockout_claimed == pytest.approx(0.0, abs=0.01)  # removing DECOY does nothing
    b1 = row(result, 0, 3)
    assert b1.joint_effect == pytest.approx(5 / M0, abs=0.02)
    assert b1.direct_effect == pytest.approx(5 / M0, abs=0.02)  # direct >> total (compensated)


def test_edges_table(result):
    e = result.edges
    s1 = e[(e["layer"] == 0) & (e["head"] == 0) & (e.source_role == "S1")].iloc[0]
    assert s1.attention == pytest.approx(0.7, abs=1e-3)
    assert s1.claimed_share == 1.0
    assert s1.effect_remove == pytest.approx(row(result, 0, 0).ablation_zero, abs=1e-3)
    decoy = e[(e["layer"] == 0) & (e["head"] == 1) & (e.source_role == "DECOY")].iloc[0]
    assert decoy.attention == pytest.approx(0.82, abs=1e-3) and abs(decoy.effect_remove) < 1e-3
    assert set(e.columns) >= {
        "layer",
        "head",
        "query_pos",
        "source_pos",
        "attention",
        "effect_remove",
        "effect_remove_lo",
        "effect_remove_hi",
    }


def test_required_columns(result):
    need = {
        "layer",
        "head",
        "head_type",
        "claim_score",
        "top_source",
        "ablation_zero",
        "ablation_mean",
        "ablation_resample",
        "knockout_claimed",
        "knockout_unclaimed",
        "routing",
        "verdict",
        "verdict_share",
    }
    assert need <= set(result.heads.columns)
    for c in ("ablation_zero", "knockout_claimed", "routing"):
        assert {f"{c}_lo", f"{c}_hi"} <= set(result.heads.columns)


def test_meta(result):
    m = result.meta
    assert m["model"] == "planted" and m["task"] == "planted-copy" and m["n_prompts"] == 32
    assert m["primary_ablation"] == "resample" and m["metric"]["name"] == "logit_diff"
    assert len(m["prompts_hash"]) == 16 and "torch" in m["versions"]
    json.dumps(m)


def test_save_load_round_trip(result, tmp_path):
    result.save(tmp_path)
    back = lensattr.Audit.load(tmp_path)
    pd.testing.assert_frame_equal(back.heads, result.heads, check_exact=True)
    pd.testing.assert_frame_equal(back.edges, result.edges, check_exact=True)
    assert back.meta == json.loads(json.dumps(result.meta, default=str))
    assert back.tensors.keys() == result.tensors.keys()
    for k, v in result.tensors.items():
        torch.testing.assert_close(back.tensors[k], v, atol=0, rtol=0, equal_nan=True)


def test_user_cache_gives_same_claims(model, result):
    task = lensattr.tasks.get("planted-copy")
    _, cache = model.run_with_cache(task.prompts().tokens)
    again = lensattr.audit(model, task, cache=cache, progress=False, n_boot=200)
    pd.testing.assert_series_equal(again.heads.verdict, result.heads.verdict)
    pd.testing.assert_series_equal(
        again.heads.claim_score, result.heads.claim_score, atol=1e-6, rtol=0
    )
    assert hook_name(Site.PATTERN, 0) in cache  # the cache really is TL's


def test_other_seed_same_verdicts(model, result):
    other = lensattr.audit(model, "planted-copy", seed=7, n_prompts=12, progress=False, n_boot=200)
    pd.testing.assert_series_equal(other.heads.verdict, result.heads.verdict)


def test_without_corrupted_prompts_uses_stated_reference(model):
    task = lensattr.tasks.get("planted-copy")
    p = task.prompts(12)
    bare = lensattr.PromptSet(tokens=p.tokens, answers=p.answers, wrong=p.wrong, roles=p.roles)
    r = lensattr.audit(model, bare, lensattr.LogitDiff(), progress=False, n_boot=200)
    assert r.meta["primary_ablation"] == "mean"
    assert "zero-ablated" in r.meta["effect_reference"]
    assert row(r, 0, 0).verdict == "faithful" and row(r, 0, 1).verdict == "misleading"


def test_repr_html_and_summary(result):
    assert "<table" in result._repr_html_()
    assert "faithful" in result.summary()


def test_norm_based_claims_and_agreement(result):
    """Value-aware claims: the decoy's norm-based attention points at the real source, and
    norm-based attention ranks the edges closer to their removal effects than raw attention."""
    d = row(result, 0, 1)
    assert d.top_source == "DECOY" and d.norm_top_source == "S1"
    assert d.norm_top_mass == pytest.approx(1.0, abs=1e-3)  # DECOY's value is zero
    e = result.edges
    dec = e[(e.layer == 0) & (e["head"] == 1)].set_index("source_role")
    assert dec.loc["DECOY", "norm_attention"] < 1e-3 < dec.loc["S1", "norm_attention"]
    ag = result.agreement
    ag = ag[ag.evidence == "|edge removal effect|"]
    assert {"attention", "norm_attention"} <= set(ag.claim)
    over_all = ag[ag.layer.isna()].set_index("claim")
    assert over_all.loc["norm_attention", "rho"] > over_all.loc["attention", "rho"]


def test_one_prompt_gives_no_confident_verdict(model):
    """n = 1: no interval, no test can pass; every head is undetermined, saying why."""
    with pytest.warns(UserWarning, match="Too few prompts"):
        r = lensattr.audit(model, "planted-copy", n_prompts=1, progress=False)
    h = r.heads
    assert (h.verdict == "undetermined").all() and (h.verdict_rule == "too_few_prompts").all()
    assert h.ablation_resample_lo.isna().all() and h.ablation_resample_hi.isna().all()
    assert h.reason.str.startswith("Too few prompts").all() and (h.carriers == "").all()
    assert r.meta["min_prompts_for_a_verdict"] == 10  # 2 / 2**10 * 14 heads < 0.05
