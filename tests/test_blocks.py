"""The functional attention block (lensattr.models.blocks) against the bridge's own hook values,
on a random GPT-2, GQA Llama and GPT-NeoX (rotary, parallel attention and MLP), with left
padding: queries, keys, values, patterns, head outputs and block outputs; the cached-prefix
form and the autograd form give the same numbers as the full no-grad one."""

import pytest
import torch

import lensattr.evidence.bare as bare
from lensattr.core.sites import Site
from lensattr.models import blocks
from lensattr.models.adapter import Adapter

from .conftest import left_padded_prompts, sharp_gpt2
from .test_architectures import build

ATOL = 1e-5


@pytest.fixture(scope="module", params=["gpt2", "neox", "llama-gqa"])
def setup(request):
    """(adapter, prompts, captured hook values) of one family on left-padded prompts."""
    model = sharp_gpt2("blocks-gpt2") if request.param == "gpt2" else build(request.param)
    a = Adapter(model)
    ps = left_padded_prompts()
    sites = (Site.RESID_PRE, Site.Q, Site.K, Site.V, Site.PATTERN, Site.Z, Site.RESID_FINAL)
    rotary = a.bare_layer(0).rotary
    sites += (Site.COS, Site.SIN) if rotary else ()
    _, store = a.run_with_cache(ps.tokens, ps.attention_mask, sites)
    return a, ps, store


def _attention(a, w, h, cos, sin, key_ok, kv, q0=0, k_pre=None, v_pre=None):
    """Attention output, pattern and z of query positions q0.. from h (positions q0..) and the
    cached keys/values of positions before q0, composed from the functional pieces."""
    q, k, v = blocks.project_qkv(w, h, a.n_heads, a.n_kv_heads, a.d_head)
    if w.rotary:
        q, k = blocks.rotate(q, cos[:, q0:], sin[:, q0:]), blocks.rotate(k, cos[:, q0:],
                                                                          sin[:, q0:])
    if k_pre is not None:
        k, v = torch.cat((k_pre, k), 1), torch.cat((v_pre, v), 1)
    kq, vq = blocks.per_query_head(k, v, kv, a.n_heads)
    ok = blocks.allowed(key_ok[:, : k.shape[1]], torch.arange(q0, k.shape[1]))[:, None]
    pattern = blocks.attention_pattern(q, kq, w.scale, ok)
    z = blocks.mix(pattern, vq)
    return blocks.project_out(w, z), pattern, z, (k, v)


def test_functional_block_equals_the_bridge_hooks(setup):
    a, ps, store = setup
    valid = ps.valid  # [batch, pos]: real tokens (padded query rows attend to nothing real)
    key_ok = ps.attention_mask.bool()
    kv = blocks.kv_map(a)
    cos, sin = store.get((Site.COS, 0)), store.get((Site.SIN, 0))
    n = ps.tokens.shape[0]
    if cos is not None:
        cos, sin = cos.expand(n, -1, -1), sin.expand(n, -1, -1)
    with torch.no_grad():
        for layer in range(a.n_layers):
            w = a.bare_layer(layer)
            x = store[(Site.RESID_PRE, layer)]
            h = w.ln1(x)
            q, k, v = blocks.project_qkv(w, h, a.n_heads, a.n_kv_heads, a.d_head)
            for got, site in ((q, Site.Q), (k, Site.K), (v, Site.V)):
                torch.testing.assert_close(got, store[(site, layer)], atol=ATOL, rtol=1e-4)
            seen = {}

            def attend(hh, _w=w, _seen=seen):
                out, _seen["pattern"], _seen["z"], _ = _attention(a, _w, hh, cos, sin, key_ok,
                                                                  kv)
                return out

            out = blocks.block(w, x, attend)
            pat = store[(Site.PATTERN, layer)].permute(0, 2, 1, 3)  # [batch, q, head, key]
            torch.testing.assert_close(seen["pattern"].permute(0, 2, 1, 3)[valid], pat[valid],
                                       atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(seen["z"][valid], store[(Site.Z, layer)][valid],
                                       atol=ATOL, rtol=1e-4)
            nxt = (store[(Site.RESID_PRE, layer + 1)] if layer + 1 < a.n_layers
                   else store[(Site.RESID_FINAL, None)])
            torch.testing.assert_close(out[valid], nxt[valid], atol=1e-4, rtol=1e-4)


def test_cached_prefix_and_autograd_give_the_same_block(setup):
    """The block of positions p0.. attending to cached keys/values of positions < p0 equals
    the full block there; under autograd the values are the same bit for bit and the gradient
    reaches the input."""
    a, ps, store = setup
    key_ok, kv, n = ps.attention_mask.bool(), blocks.kv_map(a), ps.tokens.shape[0]
    cos, sin = store.get((Site.COS, 0)), store.get((Site.SIN, 0))
    if cos is not None:
        cos, sin = cos.expand(n, -1, -1), sin.expand(n, -1, -1)
    w, x, p0 = a.bare_layer(0), store[(Site.RESID_PRE, 0)], 5
    with torch.no_grad():
        kvs = {}

        def full(h):
            out, _, _, kvs["kv"] = _attention(a, w, h, cos, sin, key_ok, kv)
            return out

        want = blocks.block(w, x, full)
        k, v = kvs["kv"]
        got = blocks.block(w, x[:, p0:], lambda h: _attention(
            a, w, h, cos, sin, key_ok, kv, p0, k[:, :p0], v[:, :p0])[0])
    torch.testing.assert_close(got, want[:, p0:], atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out = blocks.block(w, xg, lambda h: _attention(a, w, h, cos, sin, key_ok, kv)[0])
        (g,) = torch.autograd.grad(out[:, -1].sum(), xg)
    assert torch.equal(out.detach(), want)
    assert g.isfinite().all() and g.abs().sum() > 0


def test_head_out_is_the_output_projection_without_bias(setup):
    a, _, store = setup
    w, z = a.bare_layer(0), store[(Site.Z, 0)]
    with torch.no_grad():
        torch.testing.assert_close(blocks.head_out(z, a.W_O(0)), blocks.project_out(w, z) - w.b_O,
                                   atol=1e-5, rtol=1e-5)


def test_kv_map_allowed_and_rotary_reexport():
    a = Adapter(build("llama-gqa"))
    assert blocks.kv_map(a).tolist() == [0, 0, 1, 1]
    assert bare.apply_rotary is blocks.apply_rotary
    key_ok = torch.tensor([[True, True, True], [False, True, True]])
    shared = blocks.allowed(key_ok, torch.arange(1, 3))  # queries 1 and 2, every row
    assert shared.tolist() == [[[True, True, False], [True, True, True]],
                               [[False, True, False], [False, True, True]]]
    per_row = blocks.allowed(key_ok, torch.tensor([[0], [2]]))  # one query per row
    assert per_row.tolist() == [[[True, False, False]], [[False, True, True]]]


def test_check_forward_reasons():
    t = torch.ones(3)

    def differs(key, diff):
        return f"{key}: {diff}"

    assert blocks.check_forward([("a", lambda: (t, t + 1e-6))], differs) is None
    assert blocks.check_forward([("a", lambda: (t, t)), ("b", lambda: (t, t + 1))],
                                differs) == "b: 1.0"
    assert blocks.check_forward([("c", lambda: (t, t[:2]))], differs) == "c: None"

    def boom():
        raise RuntimeError("no such block")

    assert (blocks.check_forward([("d", boom)], differs)
            == "hook-free forward failed (RuntimeError: no such block)")
