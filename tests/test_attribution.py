"""Attribution patching: TransformerLens's attribution_patch, the linear limit against exact
patching on the bridge, AtP* (exact softmax, GradDrop) against hand computations, integrated
gradients, agreement with exact patching, bad input."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lensattr.compare.atp_agreement import atp_agreement
from lensattr.core.metric import MetricError
from lensattr.core.metrics import LogitDiff, LogitsMetric
from lensattr.core.prompts import PromptError, PromptSet
from lensattr.core.sites import Site
from lensattr.evidence import Engine, ablate
from lensattr.evidence.attribution import atp
from lensattr.evidence.grad_forward import GradForward
from lensattr.models.adapter import Adapter
from lensattr.models.loading import boot_bridge

from .conftest import word_tokenizer
from .test_architectures import build
from .test_architectures import prompts as family_prompts


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one torch thread avoids OpenMP stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gpt2_64():
    """A 2-layer GPT-2 in float64 with large random weights (clear second-order effects)."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
                     initializer_range=0.15)
    return boot_bridge(GPT2LMHeadModel(cfg).double(), word_tokenizer(50), "random-gpt2-f64")


@pytest.fixture(scope="module")
def llama():
    return build("llama-gqa")


def _exact(a, prompts, metric, site, layer, edit):
    """The metric (per prompt) with ``edit`` applied at one hook of the bridge."""
    v = a.read(prompts.tokens, prompts.attention_mask, metric.readout(prompts),
               {(site, layer): edit})
    return metric.compute(v, prompts, None)


def _slope(a, prompts, metric, site, layer, interp, estimate):
    """Fit log|exact(eps) - eps * estimate| against log eps, over the prompts' mean error."""
    base = _exact(a, prompts, metric, site, layer, lambda x: x)
    eps = [0.4, 0.2, 0.1, 0.05, 0.025]
    err = []
    for e in eps:
        got = _exact(a, prompts, metric, site, layer, lambda x, e=e: interp(x, e)) - base
        err.append(float((got - e * estimate).abs().mean()))
    xs, ys = torch.tensor(eps).log(), torch.tensor(err).log()
    xs, ys = xs - xs.mean(), ys - ys.mean()
    return float((xs * ys).sum() / (xs * xs).sum()), err


def test_tl_convention_equals_attribution_patch(random_gpt2, random_prompts):
    from transformer_lens.tools.analysis import attribution_patch

    p = random_prompts
    want: dict = {}
    for i in range(len(p)):
        def m(logits, i=i):
            return logits[0, -1, p.answers[i]] - logits[0, -1, p.wrong[i]]

        res = attribution_patch(random_gpt2, p.tokens[i:i + 1], p.corrupted[i:i + 1], m)
        for node, v in res.node_scores.items():
            if node.kind == "attn_head_out":
                key = (node.layer, node.head, node.position)
                want[key] = want.get(key, 0.0) + v / len(p)
    scale = max(abs(v) for v in want.values())
    assert scale > 1e-4  # the comparison is not between zeros
    for fast in (True, False):
        r = atp(random_gpt2, p, LogitDiff(), mode="tl", fast=fast)
        assert r.meta["path"] == ("hook-free" if fast else "bridge")
        got = r.tl_node_scores()
        assert set(got) == set(want)
        assert max(abs(got[k] - want[k]) for k in want) <= 1e-5
    with pytest.raises(ValueError, match="mode"):
        atp(random_gpt2, p, LogitDiff()).tl_node_scores()


def test_batches_and_paths_agree(random_gpt2, random_prompts):
    whole = atp(random_gpt2, random_prompts, LogitDiff())
    split = atp(random_gpt2, random_prompts, LogitDiff(), batch_size=2)
    bridge = atp(random_gpt2, random_prompts, LogitDiff(), fast=False)
    for kind in ("heads", "heads_by_pos", "edges", "q", "k_star"):
        a, b = getattr(whole, kind), getattr(split, kind)
        assert torch.allclose(a, b, atol=1e-6, equal_nan=True), kind
    for kind in ("heads", "heads_by_pos", "edges"):
        assert torch.allclose(getattr(whole, kind), getattr(bridge, kind), atol=1e-6,
                              equal_nan=True), kind
    assert bridge.q is None and bridge.q_star is None
    # per-position scores sum to the head score; edges only at the read row (END)
    assert torch.allclose(whole.heads_by_pos.sum(2), whole.heads, atol=1e-7)
    finite = ~torch.isnan(whole.edges)
    assert finite[:, :, :, -1].all() and not finite[:, :, :, :-1].any()
    assert torch.allclose(whole.base, Engine(random_gpt2, random_prompts, LogitDiff(),
                                             progress=False).clean, atol=1e-5)


@pytest.mark.parametrize("mode", ["noising", "denoising"])
def test_linear_limit_head_output_and_edge(gpt2_64, mode):
    """exact(eps) - eps * AtP falls as eps^2 for a head's output and for one pattern entry."""
    a, m = Adapter(gpt2_64), LogitDiff()
    g = torch.Generator().manual_seed(3)
    toks = torch.randint(1, 50, (5, 8), generator=g)
    toks[:, 0] = 0
    corr = toks.clone()
    corr[:, 3] = torch.randint(1, 50, (5,), generator=g)
    p = PromptSet(tokens=toks, corrupted=corr, answers=torch.randint(1, 50, (5,), generator=g),
                  wrong=torch.randint(1, 50, (5,), generator=g))
    r = atp(gpt2_64, p, m, mode=mode)
    base_p = p if mode == "noising" else p.corrupted_view()
    other = (p.corrupted if mode == "noising" else p.tokens)
    _, cache = a.run_with_cache(other, sites=(Site.Z, Site.PATTERN))
    for layer, head in ((0, 1), (1, 2)):
        zo = cache[(Site.Z, layer)]

        def interp(z, e, head=head, zo=zo):
            z = z.clone()
            z[:, :, head] += e * (zo[:, :, head] - z[:, :, head])
            return z

        slope, err = _slope(a, base_p, m, Site.Z, layer, interp, r.heads[:, layer, head])
        assert 1.8 < slope < 2.2, (layer, head, slope, err)
    po = cache[(Site.PATTERN, 1)]

    def interp_edge(pat, e):
        pat = pat.clone()
        pat[:, 3, -1, 3] += e * (po[:, 3, -1, 3] - pat[:, 3, -1, 3])
        return pat

    slope, err = _slope(a, base_p, m, Site.PATTERN, 1, interp_edge, r.edges[:, 1, 3, -1, 3])
    assert 1.8 < slope < 2.2, (slope, err)


def test_linear_limit_key_gqa_rotary(llama):
    """Plain AtP of a key/value head's key (GQA, rotary) against exact patching of hook_k."""
    a, m, p = Adapter(llama), LogitDiff(), family_prompts()
    r = atp(llama, p, m)
    assert r.meta["path"] == "hook-free"
    assert r.k.shape[-1] == a.n_kv_heads and r.q.shape[-1] == a.n_heads
    _, cache = a.run_with_cache(p.corrupted, sites=(Site.K,))
    ko = cache[(Site.K, 1)]  # [batch, pos, kv_head, d_head], before rotary (linear: same AtP)

    def interp(k, e):
        k = k.clone()
        k[:, 2, 1] += e * (ko[:, 2, 1] - k[:, 2, 1])
        return k

    slope, err = _slope(a, p, m, Site.K, 1, interp, r.k[:, 1, 2, 1])
    assert 1.7 < slope < 2.3, (slope, err)


def test_qk_star_is_the_exact_softmax(llama):
    """q_star / k_star equal a brute-force recomputation of each patched row's softmax, dotted
    with the pattern's gradient; a key head sums its query heads (GQA)."""
    a, m, p = Adapter(llama), LogitDiff(), family_prompts(n=3)
    r = atp(llama, p, m)
    gf = GradForward(a)
    readout = m.readout(p)
    emb, emb_c = gf.embed(p.tokens, None), gf.embed(p.corrupted, None)
    with torch.no_grad():
        _, oacts = gf.run(emb_c, readout)
    vals, acts = gf.run(emb, readout)
    pats = [la.pattern for la in acts]
    grads = torch.autograd.grad(m.compute(vals, p).sum(), pats)
    layer = 1
    b, o, G = acts[layer], oacts[layer], grads[layer].double()
    scale, P = gf.layers[layer].scale, b.pattern.detach().double()
    group = a.n_heads // a.n_kv_heads
    n, pos = p.tokens.shape
    causal = torch.ones(pos, pos, dtype=torch.bool).tril()
    for kvh in range(a.n_kv_heads):
        for s in (1, 2, 5):
            total = torch.zeros(n, dtype=torch.float64)
            for h in range(kvh * group, (kvh + 1) * group):
                q = b.q[:, :, h].detach().double()  # [batch, pos, d]
                k = b.k[:, :, kvh].detach().double().clone()
                k[:, s] = o.k[:, s, kvh].double()
                sc = (q @ k.transpose(1, 2)) * scale  # [batch, q, key]
                new = torch.softmax(sc.masked_fill(~causal, -torch.inf), -1)
                total += ((new - P[:, h]) * G[:, h]).sum((1, 2))
            assert torch.allclose(r.k_star[:, layer, s, kvh].double(), total, atol=1e-5,
                                  rtol=1e-4)
    for h in (0, 3):
        for i in (2, 6):
            q = b.q[:, :, h].detach().double().clone()
            q[:, i] = o.q[:, i, h].double()
            k = b.k[:, :, a.kv_head(h)].detach().double()
            new = torch.softmax(((q @ k.transpose(1, 2)) * scale).masked_fill(~causal,
                                                                                -torch.inf), -1)
            want = ((new - P[:, h]) * G[:, h]).sum((1, 2))
            assert torch.allclose(r.q_star[:, layer, i, h].double(), want, atol=1e-5, rtol=1e-4)
    assert (r.k_star[:, :, 2].abs() > 1e-6).any()  # the corrupted position moves something


def test_graddrop_against_hand_computation(gpt2_64, random_prompts):
    """Two layers: dropping block 0 leaves a block-1 head's gradient, dropping its own block
    zeroes it, so GradDrop = |AtP|. A block-0 head keeps, with block 1 dropped, the gradient of
    the metric with block 1's contribution frozen at its clean value (its skip connection
    kept): computed here on the bridge with hooks."""
    a, m, p = Adapter(gpt2_64), LogitDiff(), random_prompts
    r = atp(gpt2_64, p, m, graddrop=True)
    assert torch.allclose(r.graddrop[:, 1], r.heads[:, 1].abs(), atol=1e-6)
    assert torch.allclose(r.graddrop_of_mean[1], r.heads[:, 1].mean(0).abs(), atol=1e-6)
    _, clean = a.run_with_cache(p.tokens, sites=(Site.Z, Site.RESID_PRE, Site.BLOCK_OUT))
    _, corr = a.run_with_cache(p.corrupted, sites=(Site.Z,))
    frozen = clean[(Site.BLOCK_OUT, 1)] - clean[(Site.RESID_PRE, 1)]  # block 1's contribution
    tap, seen = torch.zeros_like(clean[(Site.Z, 0)], requires_grad=True), {}

    def pre(x):
        seen["pre"] = x
        return x

    hooks = {(Site.Z, 0): lambda z: z + tap, (Site.RESID_PRE, 1): pre,
             (Site.BLOCK_OUT, 1): lambda x: seen["pre"] + frozen}
    vals = a.read_grad(p.tokens, None, m.readout(p), hooks)
    assert torch.allclose(m.compute(vals, p), r.base.double(), atol=1e-6)  # same clean value
    (g,) = torch.autograd.grad(m.compute(vals, p).sum(), [tap])  # [batch, pos, head, d_head]
    dz = corr[(Site.Z, 0)] - clean[(Site.Z, 0)]
    want = (dz * g).sum((1, 3)).abs()  # [batch, head]
    assert want.max() > 1e-2
    assert torch.allclose(r.graddrop[:, 0].double(), want, atol=1e-6)
    assert not torch.allclose(want, r.heads[:, 0].abs().double(), atol=1e-3)  # not plain AtP
    with pytest.raises(ValueError, match="graddrop"):
        atp(gpt2_64, p, m, graddrop=True, fast=False)


def test_integrated_gradients(gpt2_64, random_prompts):
    m, p = LogitDiff(), random_prompts
    plain = atp(gpt2_64, p, m)
    one = atp(gpt2_64, p, m, ig_steps=1)
    assert torch.equal(plain.heads, one.heads)
    ig = {k: atp(gpt2_64, p, m, ig_steps=k, qk_fix=False).heads for k in (2, 8, 16)}
    far = (ig[2] - ig[16]).abs().max()
    near = (ig[8] - ig[16]).abs().max()
    assert far > 1e-4 and near < far / 3  # a Riemann sum converging at rate 1/k (ratio ~7)
    assert ig[16].shape == plain.heads.shape


def test_agreement_with_exact_patching(gpt2_64, random_prompts):
    m, p = LogitDiff(), random_prompts
    r = atp(gpt2_64, p, m)
    eng = Engine(gpt2_64, p, m, progress=False)
    heads = eng.adapter.heads()
    exact = (eng.run([ablate(h, method="resample") for h in heads]).values - eng.clean)
    exact = exact.T.reshape(len(p), 2, 4)  # [batch, layer, head]
    ag = atp_agreement(r.heads, exact, top=3)
    assert -1 <= ag.spearman <= 1 and -1 <= ag.kendall <= 1
    assert ag.spearman > 0.5  # AtP is a good first estimate on this small model
    assert len(ag.misses) == 3 and ag.misses["exact_rank"].min() == 1
    s = ag.summary()
    assert s["worst_miss"] == str(ag.worst())


def test_agreement_by_hand():
    exact = torch.tensor([[4.0, -3.0, 2.0], [1.0, 0.5, 0.1]])
    same = atp_agreement(exact * 2, exact, top=2)
    assert same.spearman == pytest.approx(1.0) and same.recall == 1.0
    # AtP misses the strongest head (L0H0), ranking it last
    atp_scores = torch.tensor([[0.0, -3.0, 2.0], [1.0, 0.5, 0.1]])
    ag = atp_agreement(atp_scores, exact, top=2)
    assert tuple(ag.worst()) == (0, 0)
    assert ag.misses.iloc[0]["atp_rank"] == 6 and ag.recall == 0.5
    over = atp_agreement(exact, atp_scores, top=2)  # now AtP puts a null head first
    assert tuple(over.overrated.iloc[0][["layer", "head"]]) == (0, 0)
    assert over.overrated.iloc[0]["exact_rank"] == 6
    signed = atp_agreement(-exact, exact, absolute=False)
    assert signed.spearman == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="atp and exact"):
        atp_agreement(exact, exact[:1])
    with pytest.raises(ValueError, match="top"):
        atp_agreement(exact, exact, top=0)


def test_bad_input(random_gpt2, random_prompts):
    p = random_prompts

    def argmax_metric(logits, prompts):
        return (logits[:, -1].argmax(-1) == prompts.answers).float()

    with pytest.raises(MetricError, match="argmax_metric.*no gradient"):
        atp(random_gpt2, p, LogitsMetric(argmax_metric))

    def detached(logits, prompts):
        return torch.tensor(logits[:, -1, 0].tolist())

    with pytest.raises(MetricError, match="detached"):
        atp(random_gpt2, p, LogitsMetric(detached))

    def rounded(logits, prompts):
        return (logits[:, -1, 1] * 0).round()

    with pytest.raises(MetricError, match="rounded.*zero"):
        atp(random_gpt2, p, LogitsMetric(rounded))
    with pytest.raises(ValueError, match="prompts: .*corrupted"):
        atp(random_gpt2, PromptSet(tokens=p.tokens, answers=p.answers, wrong=p.wrong),
            LogitDiff())
    with pytest.raises(PromptError, match="corrupted: expected the same shape"):
        PromptSet(tokens=p.tokens, corrupted=p.corrupted[:, :-1])
    with pytest.raises(ValueError, match="mode"):
        atp(random_gpt2, p, LogitDiff(), mode="noise")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="ig_steps"):
            atp(random_gpt2, p, LogitDiff(), ig_steps=bad)
    with pytest.raises(ValueError, match="prompts"):
        atp(random_gpt2, p.tokens, LogitDiff())


def test_frames_and_meta(random_gpt2, random_prompts):
    r = atp(random_gpt2, random_prompts, LogitDiff(), graddrop=True)
    f = r.to_frame()
    assert list(f.columns[:3]) == ["kind", "layer", "head"] and len(f) == 8
    assert torch.allclose(torch.tensor(f["score"].values), r.heads.mean(0).flatten().double(),
                          atol=1e-7)
    e = r.to_frame("edges")
    assert len(e) == 2 * 4 * 9 and (e["query_pos"] == 8).all()
    assert len(r.to_frame("graddrop")) == 8
    assert r.meta["mode"] == "noising" and r.meta["prompts"] == random_prompts.hash()
    assert not math.isnan(r.meta["seconds"])
    with pytest.raises(ValueError, match="kind"):
        r.to_frame("nope")
    nofix = atp(random_gpt2, random_prompts, LogitDiff(), qk_fix=False)
    with pytest.raises(ValueError, match="qk_fix"):
        nofix.to_frame("q_star")
    assert "AtPResult" in repr(r)


def test_padding_gqa_hook_free_equals_bridge(llama):
    """Right-padded prompts on a GQA rotary model: the hook-free path is used and equals the
    bridge path for head outputs and edges."""
    p = family_prompts(pad=True)
    fast = atp(llama, p, LogitDiff())
    slow = atp(llama, p, LogitDiff(), fast=False)
    assert fast.meta["path"] == "hook-free", fast.meta["path_reason"]
    assert fast.heads.abs().max() > 1e-3
    for kind in ("heads", "heads_by_pos", "edges"):
        assert torch.allclose(getattr(fast, kind), getattr(slow, kind), atol=1e-5,
                              equal_nan=True), kind


def _all_scores(r) -> dict:
    names = ("heads", "heads_by_pos", "edges", "q", "k", "v", "q_star", "k_star", "graddrop",
             "graddrop_of_mean", "base", "other")
    return {n: getattr(r, n) for n in names if getattr(r, n) is not None}


@pytest.mark.parametrize("name", ["gpt2_64", "llama"])
def test_shared_prefix_changes_nothing(request, name, monkeypatch):
    """Computing the positions before the first difference once (both runs starting there)
    gives every score of the run that computes them twice; GQA rotary with padding too."""
    model = request.getfixturevalue(name)
    p = family_prompts(pad=name == "llama")
    corr = p.corrupted.clone()
    corr[::2, 2] = p.tokens[::2, 2]  # half the prompts first differ at 5, the others at 2
    corr[::2, 5] = (p.tokens[::2, 5] + 1) % 50
    p = PromptSet(tokens=p.tokens, attention_mask=p.attention_mask, corrupted=corr,
                  answers=p.answers, wrong=p.wrong, roles=p.roles)
    seen = []
    real = GradForward.shared_prefix

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(GradForward, "shared_prefix", staticmethod(spy))
    for mode in ("noising", "denoising"):
        kw = dict(mode=mode, graddrop=True, ig_steps=2)
        shared = _all_scores(atp(model, p, LogitDiff(), **kw))
        assert seen[-1] == 2
        monkeypatch.setattr(GradForward, "shared_prefix", staticmethod(lambda *a: 0))
        full = _all_scores(atp(model, p, LogitDiff(), **kw))
        monkeypatch.setattr(GradForward, "shared_prefix", staticmethod(spy))
        assert shared.keys() == full.keys() and "q_star" in shared
        for k, v in full.items():
            scale = float(v.nan_to_num().abs().max()) + 1e-12
            assert torch.allclose(shared[k], v, atol=1e-6 * scale, equal_nan=True), k
            assert torch.equal(torch.isnan(shared[k]), torch.isnan(v)), k
        # nothing differs at positions 0..1: exactly zero there
        assert not shared["heads_by_pos"][:, :, :2].any() and not shared["q"][:, :, :2].any()


def test_shared_prefix_length():
    """The leading positions equal in every row (inputs, rotary angles, masks), capped at
    the first read position."""
    from lensattr.evidence.grad_forward import Embedded

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 4, generator=g)
    ok = torch.ones(3, 8, dtype=torch.bool)
    read = torch.tensor([7, 7, 7])

    def emb(resid, key_ok=ok, cos=None):
        return Embedded(resid, cos, cos, key_ok)

    y = x.clone()
    y[1, 5, 0] += 1.0
    y[2, 3, 2] -= 1e-6  # any difference counts
    assert GradForward.shared_prefix(emb(x), emb(y), read) == 3
    assert GradForward.shared_prefix(emb(x), emb(x), read) == 7  # capped at the read row
    assert GradForward.shared_prefix(emb(x), emb(y), torch.tensor([7, 2, 7])) == 2
    other_ok = ok.clone()
    other_ok[0, 1] = False
    assert GradForward.shared_prefix(emb(x), emb(x, other_ok), read) == 1
    cos = torch.randn(3, 8, 2, generator=g)
    cos2 = cos.clone()
    cos2[2, 4, 1] += 0.5
    assert GradForward.shared_prefix(emb(x, cos=cos), emb(x, cos=cos2), read) == 4
    differ_first = x.clone()
    differ_first[0, 0, 0] += 1.0
    assert GradForward.shared_prefix(emb(x), emb(differ_first), read) == 0


def test_native_norms_are_checked_and_fall_back(monkeypatch):
    """HF's fused LayerNorm is used only when the forward with it reproduces the bridge; a
    norm that does not (here: shifted) falls back to the bridge's own norms, same scores."""
    from lensattr.evidence import grad_forward

    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    model = boot_bridge(GPT2LMHeadModel(cfg), word_tokenizer(50), "gpt2-norms")
    p = family_prompts()
    good = atp(model, p, LogitDiff())
    assert good.meta["path"] == "hook-free" and good.meta["norms"] == "hf"

    class Shifted(torch.nn.Module):
        def __init__(self, ln):
            super().__init__()
            self.ln = ln

        def forward(self, x):
            return self.ln(x) + 0.05

    real = grad_forward._native
    monkeypatch.setattr(grad_forward, "_native", lambda norm: Shifted(real(norm)))
    Adapter(model)._probes.clear()  # forget the checked forward
    fallback = atp(model, p, LogitDiff())
    assert fallback.meta["path"] == "hook-free" and fallback.meta["norms"] == "bridge"
    bridge = atp(model, p, LogitDiff(), fast=False)
    for r in (good, fallback):
        assert torch.allclose(r.heads_by_pos, bridge.heads_by_pos, atol=1e-6)
        assert torch.allclose(r.edges, bridge.edges, atol=1e-6, equal_nan=True)
    assert good.heads.abs().max() > 1e-4
