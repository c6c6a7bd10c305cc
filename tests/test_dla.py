"""Residual-path decomposition: direct logit attribution, per-source decomposition and
compensators, on GPT-2, GPT-NeoX (parallel attention) and Llama-GQA (RMSNorm) built offline,
and on the hand-wired ``planted`` model whose numbers are known."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lensattr
from lensattr.core.metric import MetricError
from lensattr.core.metrics import AnswerLogProb, LogitDiff
from lensattr.core.sites import Site
from lensattr.core.types import HeadId
from lensattr.evidence import (
    Engine,
    ablate,
    compensators,
    direct_logit_attribution,
    remove_direct,
    source_dla,
    source_terms,
    source_terms_along,
)
from lensattr.evidence.decomposition import per_source_terms
from lensattr.models.adapter import Adapter, ModelError
from lensattr.models.loading import boot_bridge
from lensattr.models.zoo.planted import ROLES

from .conftest import word_tokenizer
from .test_architectures import build, prompts


def build_family(family):
    if family == "gpt2":
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
        return boot_bridge(GPT2LMHeadModel(cfg), word_tokenizer(50), "random-gpt2")
    return build(family)


def perturb_norms_and_biases(model):
    """Non-trivial final-norm gain and bias, unembedding bias and attention output biases,
    so that leaving any of them out (or centring an RMSNorm) breaks the sum."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name or "ln_1" in name or "ln_2" in name \
                    or "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module", params=["gpt2", "neox", "llama-gqa"])
def family(request):
    return request.param, build_family(request.param)


def test_components_sum_to_readout(family):
    """Every head, MLP, embedding and bias: the row sums to the logit difference read from the
    model's own logits (at END, also with padding), and the model is left unchanged."""
    name, _ = family
    model = build_family(name)  # a copy of our own to perturb
    perturb_norms_and_biases(model)
    a = Adapter(model)
    before = a.weights_hash()
    p = prompts(pad=True)
    r = direct_logit_attribution(model, p, LogitDiff())
    assert a.weights_hash() == before
    logits = model(p.tokens, attention_mask=p.attention_mask).detach()
    rows, end = torch.arange(len(p)), p.roles["END"]
    ref = logits[rows, end, p.answers] - logits[rows, end, p.wrong]
    torch.testing.assert_close(r.values.sum(1), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(r.readout, ref, atol=1e-4, rtol=0)
    kinds = {(c.kind, c.name) for c in r.components}
    n_heads = sum(c.kind == "head" for c in r.components)
    assert n_heads == a.n_layers * a.n_heads
    assert sum(c.kind == "mlp" for c in r.components) == a.n_layers
    assert ("embed", "embed") in kinds and ("bias", "b_U") in kinds
    if name == "gpt2":
        assert ("embed", "pos_embed") in kinds
    if name == "llama-gqa":  # RMSNorm, bias-free
        assert not any(c.kind == "bias" and c.name != "b_U" for c in r.components)
    else:  # LayerNorm: the final norm's bias, b_O and the MLP bias are terms of their own
        assert {("bias", "ln_final.b"), ("bias", "b_O"), ("bias", "b_out")} <= kinds
        assert r.values[:, r.index("bias", "ln_final.b")].abs().max() > 1e-3
    f = r.to_frame()
    assert len(f) == len(r.components) and {"kind", "layer", "head", "value", "p0"} <= set(f)


def test_head_dla_equals_transformer_lens(family):
    """Per-head DLA equals TL's ``stack_head_results`` + ``logit_attrs`` on the bridge (which
    divides by the cached final-norm scale but leaves out the norm's gain: equal here, where the
    gain is 1 as initialised)."""
    name, model = family
    p = prompts()  # unpadded: END is the last position for TL's pos_slice=-1
    r = direct_logit_attribution(model, p, LogitDiff())
    _, cache = model.run_with_cache(p.tokens)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)  # [layer*head, batch, d_model]
    tl = cache.logit_attrs(stack, tokens=p.answers, incorrect_tokens=p.wrong, pos_slice=-1)
    a = Adapter(model)
    ours = r.heads().reshape(len(p), a.n_layers * a.n_heads).T  # [layer*head, batch]
    torch.testing.assert_close(ours, tl.detach(), atol=1e-5, rtol=0)
    assert tl.abs().max() > 1e-3


def test_source_terms_pure_and_exact():
    """On GQA: terms sum to z W_O (<= 1e-5), equal a slow loop and the model-running
    per_source_terms; the projection equals the full terms dotted with the direction; per
    source DLA sums to the head's DLA."""
    model = build("llama-gqa")
    a, p = Adapter(model), prompts(pad=True)
    _, store = a.run_with_cache(p.tokens, p.attention_mask, sites=(Site.PATTERN, Site.V, Site.Z))
    layer, head = 1, 3
    pat, v, z = store[(Site.PATTERN, layer)], store[(Site.V, layer)], store[(Site.Z, layer)]
    W_O = a.W_O(layer)
    terms = source_terms(pat, v, W_O, head)
    out = z[:, :, head] @ W_O[head]
    torch.testing.assert_close(terms.sum(2), out, atol=1e-5, rtol=0)
    slow = torch.zeros_like(terms)
    for b in range(2):
        for q in range(p.n_pos):
            for s in range(p.n_pos):
                slow[b, q, s] = pat[b, head, q, s] * (v[b, s, a.kv_head(head)] @ W_O[head])
    torch.testing.assert_close(terms[:2], slow[:2], atol=1e-6, rtol=0)
    torch.testing.assert_close(per_source_terms(a, p, HeadId(layer, head)), terms)
    d = torch.randn(len(p), a.d_model, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(source_terms_along(pat, v, W_O, head, d),
                               torch.einsum("bqkm,bm->bqk", terms, d), atol=1e-5, rtol=0)
    s = source_dla(model, p, LogitDiff(), (layer, head))
    r = direct_logit_attribution(model, p, LogitDiff())
    torch.testing.assert_close(s.values.sum(1), s.head_dla, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.head_dla, r.heads()[:, layer, head], atol=1e-5, rtol=0)
    assert s.values[:3, -2:].abs().max() == 0  # padded sources carry nothing


@pytest.fixture(scope="module")
def planted():
    model = lensattr.load_model("planted")
    task = lensattr.tasks.get("planted-copy")
    p = task.prompts(12)
    return model, p, task.make_metric()


def test_planted_dla_and_sources(planted):
    """Per-head DLA is the planted 4 + 3 + 5 + 4 = 16; the decoy L0H1 attends DECOY 0.82 but
    its direct effect comes from S1, as does L0H0's."""
    model, p, metric = planted
    r = direct_logit_attribution(model, p, metric)
    heads = r.heads().mean(0)
    torch.testing.assert_close(heads[0, [0, 1, 3, 4]], torch.tensor([4.0, 3.0, 5.0, 4.0]),
                               atol=2e-3, rtol=0)
    assert heads[1].abs().max() < 1e-3
    decoy = source_dla(model, p, metric, (0, 1))
    assert int(decoy.pattern.mean(0).argmax()) == ROLES["DECOY"]  # what the map claims
    assert int(decoy.values.mean(0).argmax()) == ROLES["S1"]  # where the effect comes from
    assert abs(float(decoy.by_role()["S1"].mean()) - 3.0) < 2e-3
    assert decoy.by_role()["DECOY"].abs().max() < 1e-4
    faithful = source_dla(model, p, metric, (0, 0))
    assert int(faithful.values.mean(0).argmax()) == ROLES["S1"]
    f = decoy.to_frame()
    assert f.loc[f.role == "S1", "value"].item() == pytest.approx(3.0, abs=2e-3)


def test_planted_compensators(planted):
    """Ablating L0H3 (zero or resample) makes L1H0's direct effect grow by ~5 of L0H3's 5; the
    head's own DLA change equals the engine's direct-path removal, the metric change its
    ablation, and the table accounts for the total exactly. L0H4's backup L1H4 (3 of 4) shows
    only under zero ablation."""
    model, p, metric = planted
    e = Engine(model, p, metric, progress=False)
    for b in ("zero", "resample"):
        c = compensators(e, None, None, (0, 3), b)
        assert c.top_heads(1) == [HeadId(1, 0)]
        f = c.to_frame()
        row = f[(f.layer == 1) & (f["head"] == 0)].iloc[0]
        assert 4.9 < row.compensation < 5.05
        ref = e.run([remove_direct((0, 3), baseline=b), ablate((0, 3), method=b)]).values
        torch.testing.assert_close(c.direct, ref[0] - e.clean, atol=1e-4, rtol=0)
        torch.testing.assert_close(c.total, ref[1] - e.clean, atol=1e-4, rtol=0)
        torch.testing.assert_close(c.direct_minus_total, ref[0] - ref[1], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(f[[f"p{i}" for i in range(len(p))]].sum(axis=0)
                                                .values, dtype=torch.float32),
                                   c.total, atol=1e-4, rtol=0)
    zero = compensators(model, p, metric, (0, 4), "zero")
    assert zero.top_heads(1) == [HeadId(1, 4)]
    f = zero.to_frame()
    assert 2.9 < f[(f.layer == 1) & (f["head"] == 4)].compensation.item() < 3.05
    assert compensators(e, None, None, (0, 4), "resample").top_heads() == []


def test_bad_input(planted):
    model, p, metric = planted
    with pytest.raises(ValueError, match="head: head 7 out of range"):
        source_dla(model, p, metric, (0, 7))
    with pytest.raises(ValueError, match="head: layer 2 out of range"):
        compensators(model, p, metric, (2, 0))
    with pytest.raises(ValueError, match="head: 9 out of range"):  # planted has 7 heads
        _, store = Adapter(model).run_with_cache(p.tokens, sites=(Site.PATTERN, Site.V))
        source_terms(store[(Site.PATTERN, 0)], store[(Site.V, 0)], Adapter(model).W_O(0), 9)
    with pytest.raises(ValueError, match="baseline: expected one of"):
        compensators(model, p, metric, (0, 3), "median")
    with pytest.raises(MetricError, match="linear in a few logit columns"):
        direct_logit_attribution(model, p, AnswerLogProb())
    bert = build("bert")
    with pytest.raises(ModelError, match="random-bert.*post-norm encoder"):
        direct_logit_attribution(bert, prompts(), LogitDiff())


def test_readme_example_runs():
    """The README's residual-path example runs and shows what it says."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = text.split("## Residual-path decomposition")[1].split("```python")[1].split("```")[0]
    ns = {"lensattr": lensattr}
    exec(code, ns)
    assert ns["c"].top_heads(1) == [HeadId(1, 0)]
    assert abs(float(ns["src"].by_role()["S1"].mean()) - 3.0) < 2e-3
