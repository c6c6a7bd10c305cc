"""The sink is not the claim, and zero ablation does not depend on weight processing (issue 17,
items 1 and 2a): the planted sink carrier and constant-value head, pinned by plain hooks; the
routing rules; value biases folded or not."""

import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lensattr
from lensattr.claims.values import norm_shares
from lensattr.compare.judge import carriers
from lensattr.compare.verdicts import (
    HeadEvidence,
    Thresholds,
    decide,
    interpretive_change,
    routing_class,
)
from lensattr.core.metrics import LogitDiff
from lensattr.core.sites import Site, hook_name
from lensattr.core.types import HeadId
from lensattr.evidence import Engine, ablate, remove_sources
from lensattr.models.adapter import Adapter
from lensattr.models.loading import boot_bridge
from lensattr.models.zoo.planted import ROLES
from lensattr.stats.inference import Estimate

from .conftest import left_padded_prompts, word_tokenizer

TH = Thresholds()
SINK, CONST, GATED = HeadId(0, 5), HeadId(0, 6), HeadId(1, 5)
END, BOS, S1, S2 = ROLES["END"], ROLES["BOS"], ROLES["S1"], ROLES["S2"]


@pytest.fixture(scope="module")
def planted():
    return lensattr.load_model("planted")


@pytest.fixture(scope="module")
def task():
    return lensattr.tasks.get("planted-copy").prompts(16, 0)


def _metric(model, task, hooks=()):
    logits = model.run_with_hooks(task.tokens, fwd_hooks=list(hooks))
    rows = torch.arange(len(task))
    return (logits[rows, END, task.answers] - logits[rows, END, task.wrong]).detach()


def _set_z(head, value):
    def hook(z, hook):  # [batch, pos, head_index, d_head]
        z = z.clone()
        z[:, :, head.head] = value
        return z
    return hook


def _cut(head, q, k):
    def hook(pattern, hook):  # [batch, head_index, query_pos, key_pos]
        pattern = pattern.clone()
        pattern[:, head.head, q, k] = 0.0
        return pattern
    return hook


# ---- the planted heads, measured with plain TransformerLens hooks --------------------------
def test_sink_carrier_by_hand(planted, task):
    """L0H5's effect travels only through its BOS term: zeroing its output, or only the BOS
    edge at END, switches L1H5 on (+3); removing its claimed source S2 changes nothing."""
    m0 = _metric(planted, task)
    z = hook_name(Site.Z, 0)
    pat = hook_name(Site.PATTERN, 0)
    zeroed = _metric(planted, task, [(z, _set_z(SINK, 0.0))]) - m0
    no_bos = _metric(planted, task, [(pat, _cut(SINK, END, BOS))]) - m0
    no_claim = _metric(planted, task, [(pat, _cut(SINK, END, S2))]) - m0
    assert float((zeroed - 3.0).abs().max()) < 0.02
    assert float((no_bos - 3.0).abs().max()) < 0.02
    assert float(no_claim.abs().max()) < 1e-4


def test_constant_head_by_hand(planted, task):
    """L0H6 writes b_V @ W_O whatever it attends: setting z to b_V, or moving its attention,
    changes nothing; zeroing z outright (b_V removed too) switches L1H5 on (+3)."""
    m0 = _metric(planted, task)
    bv = planted.b_V[0, CONST.head].detach()
    assert float(bv.norm()) == pytest.approx(1.0)
    z, pat = hook_name(Site.Z, 0), hook_name(Site.PATTERN, 0)
    kept = _metric(planted, task, [(z, _set_z(CONST, bv))]) - m0
    moved = _metric(planted, task, [(pat, _cut(CONST, END, S1))]) - m0
    raw = _metric(planted, task, [(z, _set_z(CONST, 0.0))]) - m0
    assert float(kept.abs().max()) < 1e-4
    assert float((raw - 3.0).abs().max()) < 0.02
    # removing S1 without renormalising removes 0.8 of b_V in the hook convention: L1H5's S1
    # score rises by 19 * 0.8, it switches on
    assert float(moved.mean()) > 2.0


def test_engine_zero_ablation_keeps_b_v(planted, task):
    """The engine's zero ablation and edge edits of the constant-value head move nothing, on
    both engines; the sink carrier's BOS edge carries its whole effect."""
    rows = torch.zeros(len(task), task.n_pos, task.n_pos, dtype=torch.bool)
    rows[:, END, S1] = True
    bos = torch.zeros_like(rows)
    bos[:, END, BOS] = True
    for fast in (True, False):
        eng = Engine(planted, task, LogitDiff(), progress=False, fast=fast)
        res = eng.run([ablate(CONST, label="c"), remove_sources(CONST, rows, label="c-s1"),
                       ablate(SINK, label="s"), remove_sources(SINK, bos, label="s-bos")])
        d = res.values - eng.clean
        assert float(d[:2].abs().max()) < 1e-4, fast
        assert float((d[2] - 3.0).abs().max()) < 0.02 and float((d[3] - 3.0).abs().max()) < 0.02


@pytest.fixture(scope="module")
def zero_audit(planted):
    return lensattr.audit(planted, "planted-copy", ablation="zero", progress=False)


def _row(result, h):
    df = result.heads
    return df[(df["layer"] == h.layer) & (df["head"] == h.head)].iloc[0]


def test_sink_carrier_is_through_sink_not_faithful(zero_audit):
    r = _row(zero_audit, SINK)
    assert r.verdict == "through_sink", r.reason
    assert r.ablation_zero == pytest.approx(-3 / 16, abs=0.01)
    assert r.sink_share == pytest.approx(1.0, abs=0.02) and r.sink_share_lo > 0.5
    assert abs(r.routing) < 0.05  # keeping only C = {S2} (sink removed too) keeps nothing
    assert abs(r.necessity) < 0.05  # and removing C removes nothing
    assert "sink" in r.reason and r.routing_class == "through_sink"


def test_constant_head_has_no_effect_under_zero(zero_audit):
    r = _row(zero_audit, CONST)
    assert r.verdict == "inert", r.reason
    assert abs(r.ablation_zero) < 0.01 and r.relevance == "null"


def test_faithful_heads_are_not_carried_by_the_sink(zero_audit):
    for r in zero_audit.heads.itertuples():
        if r.verdict == "faithful":
            assert r.necessity_lo > TH.necessary and not r.sink_share_lo > TH.sink_carried


# ---- folding value biases changes no answer -------------------------------------------------
def _biased_gpt2(seed=3):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
                     initializer_range=0.3)
    hf = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for block in hf.transformer.h:  # large value biases: b_V @ W_O matters
            block.attn.c_attn.bias[2 * 32:].normal_(0, 1.0)
    return hf


def test_zero_ablation_independent_of_folding():
    hf = _biased_gpt2()
    plain = boot_bridge(copy.deepcopy(hf), word_tokenizer(50), "biased")
    folded = boot_bridge(copy.deepcopy(hf), word_tokenizer(50), "biased-folded")
    folded.enable_compatibility_mode(disable_warnings=True)
    assert float(folded.b_V.detach().abs().max()) == 0.0  # the value biases went into b_O
    prompts = left_padded_prompts()
    heads = [HeadId(layer, h) for layer in range(2) for h in range(4)]
    n, p = len(prompts), prompts.n_pos
    cut = torch.zeros(n, p, p, dtype=torch.bool)
    cut[:, :, :4] = True  # every row loses its first four sources
    ivs = [ablate(h, label=f"z{h}") for h in heads]
    ivs += [remove_sources(h, cut, label=f"e{h}") for h in heads]
    ivs += [remove_sources(h, cut, baseline="resample", label=f"r{h}") for h in heads]
    out, shares = {}, {}
    # value biases folded alone (centering W_O would change norms in its own right)
    only_bv = boot_bridge(copy.deepcopy(hf), word_tokenizer(50), "biased-bv-folded")
    only_bv.enable_compatibility_mode(disable_warnings=True, fold_ln=False,
                                      center_writing_weights=False, center_unembed=False)
    for name, model in (("plain", plain), ("folded", folded), ("only_bv", only_bv)):
        eng = Engine(model, prompts, LogitDiff(), progress=False)
        out[name] = eng.run(ivs).values - eng.clean
        shares[name] = norm_shares(eng, Adapter(model), prompts)[0]
    torch.testing.assert_close(out["only_bv"], out["plain"], atol=2e-3, rtol=2e-3)
    # the audit's norm-based attention separates b_V too
    shares["folded"] = shares["only_bv"]
    ok = torch.isfinite(shares["plain"])
    assert bool((ok == torch.isfinite(shares["folded"])).all()) and float(ok.float().mean()) > 0.3
    torch.testing.assert_close(shares["folded"][ok], shares["plain"][ok], atol=2e-3, rtol=0)
    moved = out["plain"].abs() > 0.05
    assert float(moved.float().mean()) > 0.6  # mostly not a comparison of tiny numbers (0.73)
    torch.testing.assert_close(out["folded"], out["plain"], atol=2e-3, rtol=2e-3)
    # the hook convention (z := 0) would differ: the check can fail
    raw = {}
    for name, model in (("plain", plain), ("folded", folded)):
        rows = torch.arange(n)
        end = prompts.roles["END"]
        base = model(prompts.tokens, attention_mask=prompts.attention_mask)
        hit = model.run_with_hooks(prompts.tokens, attention_mask=prompts.attention_mask,
                                   fwd_hooks=[(hook_name(Site.Z, 0), _set_z(HeadId(0, 0), 0.0))])
        d = [(x[rows, end, prompts.answers] - x[rows, end, prompts.wrong]).detach()
             for x in (base, hit)]
        raw[name] = d[1] - d[0]
    assert float((raw["plain"] - raw["folded"]).abs().max()) > 0.05


def test_meta_records_weight_processing(planted):
    r = lensattr.audit(planted, "planted-copy", heads=[(0, 0)], n_prompts=10, progress=False)
    wp = r.meta["weight_processing"]
    assert wp["value_bias_in_b_V"] is True and wp["compatibility_mode"] is False
    assert "b_V" in wp["zero_ablation"]


# ---- the routing rules on hand-made evidence -----------------------------------------------
def est(v, lo, hi, n=8):
    return Estimate(v, lo, hi, torch.full((n,), float(v)))


BIG = est(0.3, 0.25, 0.35)


def ev(rho, sink=None, nec=None, level=0.95):
    return HeadEvidence(HeadId(0, 0), "resample", BIG, 0.001, 0.5, rho, False, sink=sink,
                        necessity=nec, level=level)


def test_faithful_needs_necessity():
    full = est(1.0, 0.9, 1.1)
    assert decide(ev(full, nec=full), TH).label == "faithful"
    v = decide(ev(full, nec=est(0.1, 0.0, 0.2)), TH)  # sufficient, not necessary
    assert v.label == "undetermined" and v.rule == "claim_not_necessary"
    assert decide(ev(full, nec=est(0.6, 0.3, 0.9)), TH).label == "undetermined"
    assert decide(ev(full), TH).label == "undetermined"  # necessity not measured


def test_sink_share_takes_precedence():
    full = est(1.0, 0.9, 1.1)
    v = decide(ev(est(0.0, -0.1, 0.1), sink=est(0.95, 0.8, 1.1), nec=est(0, -0.1, 0.1)), TH)
    assert v.label == "through_sink" and v.numbers["sink_share"] == pytest.approx(0.95)
    assert routing_class(full, TH, sink=est(0.9, 0.6, 1.2), necessity=full) == "through_sink"
    # a sink share whose interval reaches 0.5 does not make the class
    assert routing_class(full, TH, sink=est(0.6, 0.4, 0.8), necessity=full) == "through_claim"


def test_fcr_level_is_reported():
    full = est(1.0, 0.9, 1.1)
    v = decide(ev(full, nec=full, level=0.999), TH)
    assert v.numbers["interval_level"] == 0.999 and "99.9%" in v.reason


def test_interpretive_change():
    assert not interpretive_change(["inert", "negligible"])
    assert not interpretive_change(["faithful", "undetermined"])
    assert interpretive_change(["faithful", "misleading"])
    assert interpretive_change(["compensated", "inert"])
    assert interpretive_change(["through_sink", "negligible"])


def test_carriers_need_an_interval():
    head = Estimate(0.4, 0.35, 0.45, torch.full((8,), 0.4))
    steady = Estimate(0.3, 0.28, 0.32, torch.full((8,), 0.3))
    noisy = Estimate(0.3, -0.5, 1.1, torch.tensor([2.0, -1.4, 1.5, -0.8, 1.2, -0.6, 0.9, -0.4]))
    assert carriers([steady, noisy], ["S1", "S2"], head, TH) == "S1"
    # a point share of 0.75 alone no longer makes a carrier
    assert math.isfinite(noisy.value) and noisy.value / head.value > 0.5
