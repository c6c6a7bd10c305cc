"""Architecture families, built from configs offline: GPT-NeoX, Llama with grouped-query
attention, BERT. The full audit runs the verdict rules on each (enough prompts, sharp models),
and the per-query-head invariants hold."""

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import lensattr
from lensattr.compare.verdicts import VERDICTS, Thresholds
from lensattr.core.metrics import HiddenCosineToClean, LogitDiff
from lensattr.core.prompts import PromptSet
from lensattr.core.sites import Site
from lensattr.core.types import HeadId
from lensattr.evidence import Engine, ablate, remove_sources
from lensattr.evidence.decomposition import head_output, per_source_terms
from lensattr.models.adapter import Adapter, ModelError
from lensattr.models.loading import boot_bridge
from lensattr.stats.inference import min_prompts

from .conftest import word_tokenizer

SMALL = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=32, initializer_range=0.3)


def build(family):
    torch.manual_seed(0)
    if family == "neox":
        hf = GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL, bos_token_id=0, eos_token_id=0))
    elif family == "llama-gqa":
        hf = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2, bos_token_id=0,
                                          eos_token_id=0))
    else:
        hf = BertForMaskedLM(BertConfig(**SMALL))
    return boot_bridge(hf, word_tokenizer(50), f"random-{family}")


@pytest.fixture(scope="module", params=["neox", "llama-gqa", "bert"])
def family_model(request):
    return request.param, build(request.param)


def prompts(n=6, p=9, pad=False):
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(1, 50, (n, p), generator=g)
    toks[:, 0] = 0
    corr = toks.clone()
    corr[:, 2] = torch.randint(1, 50, (n,), generator=g)
    mask = None
    if pad:
        mask = torch.ones(n, p, dtype=torch.long)
        mask[: n // 2, -2:] = 0
    return PromptSet(tokens=toks, attention_mask=mask, corrupted=corr,
                     answers=torch.randint(1, 50, (n,), generator=g),
                     wrong=torch.randint(1, 50, (n,), generator=g), roles={"S": 2, "TOK": 3})


# The full audit. A verdict needs at least min_prompts(n_heads) prompts (9 for these 8 heads:
# below that no head can pass BH, every head is ``too_few_prompts``); random heads mix their
# sources (routing 0.4-0.7), so at 9-64 prompts every routing interval still straddles a band
# edge. 128 prompts decide some heads on every family, in a few seconds each.
AUDIT_PROMPTS = 128


def audit_task(model, family, n=AUDIT_PROMPTS, p=9):
    """n prompts of BOS + random words, corrupted at S (a different word; resample baseline).
    Decoders: the answer is the clean run's top token at END and the wrong answer the token the
    corruption raises most, so the corrupted run moves the logit difference on every prompt
    (a significant reference). BERT reads the hidden state at TOK (cosine to clean)."""
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(1, 50, (n, p), generator=g)
    toks[:, 0] = 0
    corr = toks.clone()
    corr[:, 2] = (toks[:, 2] - 1 + torch.randint(1, 49, (n,), generator=g)) % 49 + 1
    ans = wrong = None
    if family != "bert":
        a = Adapter(model)
        clean, bad = a.forward(toks)[:, -1].float(), a.forward(corr)[:, -1].float()
        ans = clean.argmax(-1)
        raise_ = (bad - clean).index_put((torch.arange(n), ans), torch.tensor(-torch.inf))
        wrong = raise_.argmax(-1)
    return PromptSet(tokens=toks, corrupted=corr, answers=ans, wrong=wrong,
                     roles={"S": 2, "TOK": 3})


def audit_metric(family):
    return HiddenCosineToClean("TOK") if family == "bert" else LogitDiff()


@pytest.fixture(scope="module", params=["neox", "llama-gqa", "bert"])
def sharp_audit(request):
    family = request.param
    model = build(family)  # seeded (torch.manual_seed(0)), initializer_range 0.3
    p = audit_task(model, family)
    torch.manual_seed(0)
    r = lensattr.audit(model, p, audit_metric(family), progress=False)
    return family, model, p, r


SHOWN = ["layer", "head", "verdict", "verdict_rule", "relevance", "routing_lo", "routing_hi",
         "necessity_lo", "sink_share_lo", "ablation_resample_lo", "ablation_resample_hi"]


def show(h, rows=None):
    """The heads table's verdict columns (and reasons) for assertion messages."""
    h = h if rows is None else h[rows]
    return "\n" + h[SHOWN].round(3).to_string() + "\n" + "\n".join(
        f"L{r.layer}H{r.head}: {r.reason}" for r in h.itertuples())


# What the current rules give on these seeded models and prompts (resample baseline, 128
# prompts). Deterministic: models seeded, prompts from a seeded torch.Generator, the
# sign-flip test's Monte Carlo seeded by audit(seed=0). A change here is a change in the
# evidence or the rules, to be explained, not re-pinned blindly.
PINNED_COUNTS = {
    "neox": {"partial": 1, "undetermined": 7},
    "llama-gqa": {"partial": 3, "undetermined": 5},
    "bert": {"faithful": 1, "partial": 4, "undetermined": 3},
}
PINNED_HEADS = {  # (layer, head) -> (verdict, verdict_rule)
    "neox": {(0, 0): ("partial", "partial"), (0, 1): ("undetermined", "routing_straddles")},
    "llama-gqa": {(0, 1): ("partial", "partial"), (0, 2): ("partial", "partial"),
                  (1, 0): ("undetermined", "routing_straddles")},
    "bert": {(0, 3): ("faithful", "faithful"), (0, 1): ("partial", "partial"),
             (0, 0): ("undetermined", "routing_straddles")},
}


def test_full_audit_runs_the_rules(sharp_audit):
    family, model, p, r = sharp_audit
    h, a = r.heads, Adapter(model)
    assert len(h) == a.n_layers * a.n_heads
    assert len(p) >= min_prompts(a.n_layers * a.n_heads) + 2
    assert r.meta["n_prompts"] == AUDIT_PROMPTS
    assert r.meta["primary_ablation"] == "resample"
    assert (h.baseline == "resample").all(), show(h)
    assert h.verdict.isin(VERDICTS).all(), show(h)
    assert h["ablation_zero"].notna().all()
    if family == "bert":  # post-norm encoder: no direct path
        assert h["direct_effect"].isna().all()
    else:
        assert h["direct_effect"].notna().all()
    assert (h.verdict_rule != "too_few_prompts").all(), show(h)
    assert (h.verdict != "undetermined").any(), show(h)
    assert (h.relevance == "relevant").any(), show(h)
    assert h.verdict.value_counts().to_dict() == PINNED_COUNTS[family], show(h)
    for (layer, head), want in PINNED_HEADS[family].items():
        row = h[(h["layer"] == layer) & (h["head"] == head)].iloc[0]
        assert (row.verdict, row.verdict_rule) == want, show(h)


def test_full_audit_verdict_invariants(sharp_audit):
    """What each label promises, whatever the pinned labels are."""
    family, _, _, r = sharp_audit
    h, th, b = r.heads, Thresholds(), r.meta["primary_ablation"]
    faithful = h.verdict == "faithful"
    bad = faithful & ~((h.routing_lo >= th.faithful_lo) & (h.routing_hi <= th.faithful_hi)
                       & (h.necessity_lo > th.necessary)
                       & ((h.sink_share_lo <= th.sink_carried) | h.sink_share_lo.isna()))
    assert not bad.any(), show(h, bad)
    bad = (h.verdict == "misleading") & ~(h.routing_hi < th.misleading_hi)
    assert not bad.any(), show(h, bad)
    bad = (h.verdict == "through_sink") & ~(h.sink_share_lo > th.sink_carried)
    assert not bad.any(), show(h, bad)
    routed = h.verdict.isin(["faithful", "misleading", "partial", "through_sink"])
    assert not (routed & (h.relevance != "relevant")).any(), show(h, routed)
    null = h.verdict.isin(["inert", "negligible"])
    bad = null & ~((h[f"ablation_{b}_lo"] >= -th.delta) & (h[f"ablation_{b}_hi"] <= th.delta))
    assert not bad.any(), show(h, bad)
    assert not (null & (h.relevance != "null")).any(), show(h, null)
    decided = h.verdict != "undetermined"
    share = h.verdict_share[decided]
    assert share.notna().all() and share.between(0, 1).all(), show(h, decided)
    assert h.verdict_share[~decided].isna().all(), show(h, ~decided)


EFFECT_COLUMNS = [f"ablation_{m}{s}" for m in ("zero", "mean", "resample")
                  for s in ("", "_lo", "_hi")] + [
    "routing", "routing_lo", "routing_hi", "routing_zero", "routing_mean", "routing_resample"]


def test_full_audit_engine_path(sharp_audit):
    """Decoders with a logit metric run every intervention hook-free, and it gives the bridge's
    numbers (fast=False); BERT's hidden-state metric keeps the bridge."""
    family, model, p, r = sharp_audit
    eng = r.meta["engine"]
    if family == "bert":
        assert eng["path"] == "bridge", eng
        assert "hidden" in eng["why_not_hook_free"], eng
        assert eng["rows"]["bare"] == 0 and eng["rows"]["bridge"] > 0, eng
        return
    assert eng["path"] == "hook-free" and eng["why_not_hook_free"] is None, eng
    assert eng["rows"]["bridge"] == 0 and eng["rows"]["bare"] > 0, eng
    torch.manual_seed(0)
    ref = lensattr.audit(model, p, audit_metric(family), progress=False, fast=False)
    assert ref.meta["engine"]["path"] == "bridge", ref.meta["engine"]
    np.testing.assert_allclose(r.heads[EFFECT_COLUMNS].to_numpy(float),
                               ref.heads[EFFECT_COLUMNS].to_numpy(float), rtol=0, atol=1e-4,
                               err_msg=show(r.heads) + show(ref.heads))
    assert (r.heads.verdict == ref.heads.verdict).all(), show(r.heads) + show(ref.heads)


def test_per_query_head_decomposition(family_model):
    """Per-source terms (using the KV head each query head reads) sum to the head output, and
    removing a source set equals subtracting its terms, for every query head."""
    family, model = family_model
    a, p = Adapter(model), prompts()
    S = torch.rand(6, 9, 9, generator=torch.Generator().manual_seed(4)) < 0.3
    for h in (HeadId(1, 0), HeadId(1, 1), HeadId(1, 3)):
        terms = per_source_terms(a, p, h)
        out = head_output(a, p, h)
        torch.testing.assert_close(terms.sum(2), out, atol=1e-5, rtol=0)
        if family == "bert":  # hook_pattern edits are discarded there: see the HF reference test
            continue
        store = {}

        def edit(pat, _h=h):
            pat = pat.clone()
            pat[:, _h.head] = pat[:, _h.head].masked_fill(S, 0.0)
            return pat

        a.forward(p.tokens, hooks={(Site.PATTERN, h.layer): edit,
                                   (Site.Z, h.layer): lambda z, _s=store: _s.update(z=z)})
        edited = store["z"][:, :, h.head] @ a.W_O(h.layer)[h.head]
        torch.testing.assert_close(edited, out - (terms * S[..., None]).sum(2), atol=1e-5,
                                   rtol=0)


def test_bert_edge_edits_match_hf_reference(monkeypatch):
    """On BERT the bridge delegates attention to HF and discards hook_pattern edits, so lensattr
    edits the heads' outputs instead. Reference: HF's own eager attention with the weights
    edited inside it (an independent implementation)."""
    from transformers.models.bert import modeling_bert

    model = build("bert")
    a, p = Adapter(model), prompts(pad=True)
    assert not a.pattern_editable
    h = HeadId(0, 2)
    S = torch.rand(6, 9, 9, generator=torch.Generator().manual_seed(5)) < 0.4
    e = Engine(model, p, HiddenCosineToClean("TOK"), progress=False)
    got = e.run([remove_sources(h, S), remove_sources(h, S, renormalise=True)]).values
    original = modeling_bert.eager_attention_forward
    bert = model.original_model.bert

    def reference(renorm):
        def edited(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
            out, w = original(module, query, key, value, attention_mask, scaling, dropout, **kw)
            if module is not bert.encoder.layer[h.layer].attention.self:
                return out, w
            w = w.clone()
            w[:, h.head] = w[:, h.head].masked_fill(S, 0.0)
            if renorm:
                w[:, h.head] = w[:, h.head] / w[:, h.head].sum(-1, keepdim=True)
            return torch.matmul(w, value).transpose(1, 2).contiguous(), w

        monkeypatch.setattr(modeling_bert, "eager_attention_forward", edited)
        hid = bert(input_ids=p.tokens, attention_mask=p.attention_mask).last_hidden_state
        monkeypatch.setattr(modeling_bert, "eager_attention_forward", original)
        clean = bert(input_ids=p.tokens, attention_mask=p.attention_mask).last_hidden_state
        rows, tok = torch.arange(6), p.roles["TOK"]
        return torch.cosine_similarity(hid[rows, tok], clean[rows, tok], dim=-1).detach()

    torch.testing.assert_close(got[0], reference(False), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], reference(True), atol=1e-5, rtol=0)
    assert (got[0] < 1 - 1e-4).any()  # the edit did something
    with pytest.raises(ValueError, match="edge edits with edits in other layers"):
        from lensattr.evidence import Intervention

        e.run([Intervention("mixed", ablations=ablate((0, 0)).ablations,
                            edges=remove_sources((1, 0), S).edges)])


def test_gqa_heads_of_one_group_are_separate():
    model = build("llama-gqa")
    a = Adapter(model)
    assert (a.n_heads, a.n_kv_heads, a.kv_head(1), a.kv_head(2)) == (4, 2, 0, 1)
    e = Engine(model, prompts(), LogitDiff(), progress=False)
    all_src = torch.ones(6, 9, 9, dtype=torch.bool)
    res = e.run([ablate((1, 0)), ablate((1, 1)),
                 remove_sources((1, 0), all_src, label="all0"),
                 remove_sources((1, 1), all_src, label="all1")])
    assert not torch.allclose(res.values[0], res.values[1])  # heads sharing K/V differ
    torch.testing.assert_close(res.values[0], res.values[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(res.values[1], res.values[3], atol=1e-5, rtol=0)


def test_bert_mask_and_hidden_readout():
    model = build("bert")
    a = Adapter(model)
    assert not a.is_causal
    p = prompts(pad=True)
    e = Engine(model, p, HiddenCosineToClean("TOK"), progress=False)
    torch.testing.assert_close(e.clean, torch.ones(6), atol=1e-5, rtol=0)
    hf = model.original_model.bert
    ref = hf(input_ids=p.tokens, attention_mask=p.attention_mask).last_hidden_state
    _, store = a.run_with_cache(p.tokens, p.attention_mask, sites=(Site.BLOCK_OUT,))
    torch.testing.assert_close(store[(Site.BLOCK_OUT, 1)], ref.detach(), atol=1e-5, rtol=0)
    r = lensattr.audit(model, p, HiddenCosineToClean("TOK"), progress=False, n_boot=50)
    pat = r.tensors["pattern_example"]  # prompt 0 is padded: its last two keys get nothing
    assert pat[..., -2:].abs().max() < 1e-6
    assert pat[..., :-2, 1:].sum() > 0  # bidirectional: queries attend later keys


def test_logit_metric_refused_without_trained_head():
    model = build("bert")
    model._lensattr_logits_meaningful = False
    with pytest.raises(ModelError, match="no trained output head"):
        Engine(model, prompts(), LogitDiff(), progress=False)


def test_cache_equals_run_with_cache_without_the_unembedding(family_model):
    """``Adapter.cache`` captures the same activations as ``run_with_cache`` (bit for bit) and
    stops after the last block: the final norm never runs (no [batch, pos, d_vocab] logits),
    unless a site asks for it; hooks the caller passes still run."""
    family, model = family_model
    a = Adapter(model)
    p = prompts(pad=True)
    sites = (Site.PATTERN, Site.Z, Site.V, Site.BLOCK_OUT)
    _, ref = a.run_with_cache(p.tokens, p.attention_mask, sites=sites)
    fired = []
    hooks = {(Site.Z, 0): lambda z: fired.append("z0") or z * 2.0}
    _, ref2 = a.run_with_cache(p.tokens, p.attention_mask, sites=sites, hooks=hooks)
    got = a.cache(p.tokens, p.attention_mask, sites=sites)
    got2 = a.cache(p.tokens, p.attention_mask, sites=sites, hooks=hooks)
    assert set(got) == set(ref) and len(got) == 4 * a.n_layers
    for k in ref:
        assert torch.equal(got[k], ref[k]) and torch.equal(got2[k], ref2[k]), k
    assert not torch.equal(got2[(Site.Z, 0)], got[(Site.Z, 0)]) and fired.count("z0") == 2
    if family == "bert":
        return  # no final norm hook on the BERT bridge
    seen = []
    spy = {(Site.LN_FINAL_OUT, None): lambda x: seen.append(x.shape) or x}
    a.cache(p.tokens, p.attention_mask, sites=(Site.PATTERN,), hooks=spy)
    assert seen == []  # stopped before the final norm
    st = a.cache(p.tokens, p.attention_mask, sites=(Site.LN_FINAL_SCALE,), hooks=spy)
    assert len(seen) == 1 and (Site.LN_FINAL_SCALE, None) in st  # a site beyond: runs on
