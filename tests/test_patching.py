"""Activation and path patching: equal to TransformerLens's own functions and to a slow
hand-written reference; invariants; bad input."""

import pytest
import torch
import transformer_lens.patching as tlp

from lensattr.core.metric import MetricError
from lensattr.core.metrics import LogitDiff, LogitsMetric
from lensattr.core.prompts import PromptError, PromptSet
from lensattr.core.sites import Site
from lensattr.evidence.patch_runs import Cell, PatchRuns
from lensattr.evidence.patching import activation_patching, path_patching
from lensattr.models.adapter import ModelError

from .conftest import sharp_gpt2
from .test_architectures import build
from .test_architectures import prompts as _prompts

TOL = 1e-5


def prompts():
    return _prompts(n=4, p=6)  # small: TL's sweeps run one forward per cell
TL_NAMES = {"z": "out", "q": "q", "k": "k", "v": "v", "pattern": "pattern"}


@pytest.fixture(scope="module")
def gpt2():
    """A 2-layer, 4-head GPT-2 with weights large enough for patches to move the metric."""
    return sharp_gpt2("patch-gpt2")


@pytest.fixture(scope="module")
def llama():
    return build("llama-gqa")  # 4 query heads, 2 key/value heads


def tl_metric(p: PromptSet):
    rows = torch.arange(len(p))

    def metric(logits):  # TL's convention: logits [batch, pos, d_vocab] -> [batch]
        return logits[rows, -1, p.answers] - logits[rows, -1, p.wrong]
    return metric


def tl_sweep(model, p, site, by, direction="denoising"):
    fn = (tlp.get_act_patch_attn_head_pattern_dest_src_pos if by == "dest_src" else getattr(
        tlp, f"get_act_patch_attn_head_{TL_NAMES[site]}_{'all_pos' if by == 'all' else 'by_pos'}"))
    src, base = (p.tokens, p.corrupted) if direction == "denoising" else (p.corrupted, p.tokens)
    _, cache = model.run_with_cache(src)
    return fn(model, base, cache, tl_metric(p), reduce="none", baseline=True)


CASES = [(s, b) for s in ("z", "q", "k", "v", "pattern") for b in ("all", "pos")]


@pytest.mark.parametrize("site,by", CASES + [("pattern", "dest_src")])
def test_equals_transformer_lens_gpt2(gpt2, site, by):
    p = prompts()
    ref = tl_sweep(gpt2, p, site, by)
    res = activation_patching(gpt2, p, LogitDiff(), site=site, by=by)
    assert res.meta["path"] == "bare"
    assert res.values.shape == ref.values.shape
    assert res.delta.abs().max() > 0.05  # the patches move the metric: the check can fail
    torch.testing.assert_close(res.values, ref.values.cpu(), atol=TOL, rtol=0)
    torch.testing.assert_close(res.base, ref.baseline.cpu(), atol=TOL, rtol=0)


@pytest.mark.parametrize("site,by", CASES)
def test_equals_transformer_lens_gqa(llama, site, by):
    """Grouped-query attention: k and v cells are key/value heads, as TL's hooks are."""
    p = prompts()
    ref = tl_sweep(llama, p, site, by)
    res = activation_patching(llama, p, LogitDiff(), site=site, by=by)
    n_heads = 2 if site in ("k", "v") else 4
    assert n_heads in res.values.shape and res.meta["path"] == "bare"
    assert res.delta.abs().max() > 0.05
    torch.testing.assert_close(res.values, ref.values.cpu(), atol=TOL, rtol=0)


@pytest.mark.parametrize("site,by", [("z", "pos"), ("k", "all"), ("pattern", "pos")])
def test_noising_equals_transformer_lens(gpt2, site, by):
    p = prompts()
    ref = tl_sweep(gpt2, p, site, by, direction="noising")
    res = activation_patching(gpt2, p, LogitDiff(), site=site, by=by, direction="noising")
    torch.testing.assert_close(res.values, ref.values.cpu(), atol=TOL, rtol=0)
    # noising: the base is the clean run, the source the corrupted run
    torch.testing.assert_close(res.base, tl_metric(p)(gpt2(p.tokens)).detach(), atol=TOL,
                               rtol=0)


@pytest.mark.parametrize("site,by", [("z", "pos"), ("q", "all"), ("v", "pos")])
def test_bridge_path_and_batching_agree(llama, site, by):
    """The bridge fallback, a plain-callable metric (all logits, TL's convention) and one cell
    per forward give the hook-free batched numbers."""
    p = prompts()
    fast = activation_patching(llama, p, LogitDiff(), site=site, by=by)
    slow = activation_patching(llama, p, LogitDiff(), site=site, by=by, fast=False)
    one = activation_patching(llama, p, LogitDiff(), site=site, by=by, batch_size=1)
    fn = LogitsMetric(lambda logits, q: tl_metric(q)(logits))
    callable_ = activation_patching(llama, p, fn, site=site, by=by)
    assert slow.meta["path"] == "bridge" and callable_.meta["path"] == "bridge"
    for other in (slow, one, callable_):
        torch.testing.assert_close(other.values, fast.values, atol=TOL, rtol=0)


def test_encoder_uses_the_bridge_and_refuses_patterns():
    bert = build("bert")
    p = prompts()
    fn = LogitsMetric(lambda logits, q: tl_metric(q)(logits))
    ref = tl_sweep(bert, p, "z", "pos")
    res = activation_patching(bert, p, fn, site="z", by="pos")
    assert res.meta["path"] == "bridge"
    torch.testing.assert_close(res.values, ref.values.cpu(), atol=TOL, rtol=0)
    with pytest.raises(ModelError, match="pattern"):
        activation_patching(bert, p, fn, site="pattern")


def test_clean_into_clean_changes_nothing(gpt2, llama):
    same = prompts()
    same = PromptSet(tokens=same.tokens, corrupted=same.tokens, answers=same.answers,
                     wrong=same.wrong)
    for model in (gpt2, llama):
        for site in ("z", "q", "k", "v", "pattern"):
            res = activation_patching(model, same, LogitDiff(), site=site, by="pos")
            assert torch.equal(res.values, res.base.expand_as(res.values))
        # and through the forward itself (no short cut): the base run's own activations
        runs = PatchRuns(model, prompts(), LogitDiff())
        for site in (Site.Z, Site.Q, Site.K, Site.PATTERN):
            cells = [Cell(site, layer, h) for layer in range(2) for h in range(2)]
            n = runs.n
            idx = torch.arange(n).repeat(len(cells))
            src = runs.base_acts[(site, 0)][idx]
            mask = torch.zeros(src.shape[:-1] if site != Site.PATTERN else src.shape,
                               dtype=torch.bool)
            mask[:, :, 0] = True
            vals, _ = runs._run_rows(Cell(site, 0, 0), cells, idx, mask, src)
            torch.testing.assert_close(vals, runs.base.expand_as(vals), atol=TOL, rtol=0)


def test_result_statistics_frame_and_export(gpt2):
    p = prompts()
    res = activation_patching(gpt2, p, LogitDiff(), site="z", by="all")
    delta = res.values - res.base
    want = delta[1, 2].mean() / (res.source - res.base).mean()  # ratio of means, by hand
    assert abs(float(res.effect[1, 2]) - float(want)) < 1e-5
    assert (res.effect_lo <= res.effect).all() and (res.effect <= res.effect_hi).all()
    df = res.to_frame()
    assert len(df) == 8 and {"layer", "head", "effect", "p_value", "metric"} <= set(df.columns)
    row = df[(df["layer"] == 1) & (df["head"] == 2)].iloc[0]
    assert abs(row.metric - float(res.values[1, 2].mean())) < 1e-6
    tl = res.to_transformer_lens()
    assert isinstance(tl, tlp.PatchingResult) and not tl.reduced
    torch.testing.assert_close(tl.effect(), delta)
    torch.testing.assert_close(tl.mean(), res.mean())
    assert len(tl.index_df) == 8 and list(tl.index_df.columns) == ["layer", "head"]
    assert res.meta["direction"] == "denoising" and res.meta["site"] == "z"


# ---- path patching -----------------------------------------------------------------------
def hand_path_patch(model, p, sender, receiver, comp):
    """Wang et al. (2022), denoising, the slow way with explicit bridge hooks: (1) run the
    corrupted prompts with every head and MLP frozen at its corrupted value except the sender
    (clean), and record the receiver's input projection; (2) run the corrupted prompts with
    only the receiver's q/k/v replaced by it. Receiver None: the logits of run (1)."""
    Ls, hs = sender
    L = model.cfg.n_layers
    _, clean = model.run_with_cache(p.tokens)
    _, corr = model.run_with_cache(p.corrupted)

    def freeze_z(layer):
        def hook(z, hook):
            z = corr[f"blocks.{layer}.attn.hook_z"].clone()
            if layer == Ls:
                z[:, :, hs] = clean[f"blocks.{layer}.attn.hook_z"][:, :, hs]
            return z
        return hook

    hooks = [(f"blocks.{layer}.attn.hook_z", freeze_z(layer)) for layer in range(L)]
    hooks += [(f"blocks.{layer}.hook_mlp_out", lambda x, hook: corr[hook.name])
              for layer in range(L)]
    if receiver is None:
        return tl_metric(p)(model.run_with_hooks(p.corrupted, fwd_hooks=hooks)).detach(), None
    Lr, hr = receiver
    name = f"blocks.{Lr}.attn.hook_{comp}"
    got = {}
    hooks.append((name, lambda x, hook: got.update(x=x.clone())))
    model.run_with_hooks(p.corrupted, fwd_hooks=hooks)

    def patch(x, hook):
        x = x.clone()
        x[:, :, hr] = got["x"][:, :, hr]
        return x
    pat = {}
    kv = hr * (model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads))
    logits = model.run_with_hooks(p.corrupted, fwd_hooks=[
        (name, patch), (f"blocks.{Lr}.attn.hook_pattern",
                        lambda x, hook: pat.update(x=x[:, kv if comp != "q" else hr]))])
    rows = torch.arange(len(p))
    change = pat["x"][rows, -1] - corr[f"blocks.{Lr}.attn.hook_pattern"][
        rows, kv if comp != "q" else hr, -1]
    return tl_metric(p)(logits).detach(), change.detach()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_path_patching_equals_hand_written_reference(family, gpt2, llama):
    model = gpt2 if family == "gpt2" else llama
    p = prompts()
    res = path_patching(model, p, LogitDiff(), (0, 1))
    assert res.meta["path"] == "bare"
    assert torch.isnan(res.values[:, 0]).all()  # receivers before the sender: not computed
    for c, comp in enumerate(res.components):
        for h in range(2 if (family == "llama" and comp != "q") else 4):
            want, change = hand_path_patch(model, p, (0, 1), (1, h), comp)
            torch.testing.assert_close(res.values[c, 1, h], want, atol=TOL, rtol=0)
            torch.testing.assert_close(res.pattern_change[c, 1, h], change, atol=TOL, rtol=0)
    if family == "llama":
        assert torch.isnan(res.values[1:, 1, 2:]).all()  # k/v receivers: 2 key/value heads
    want, _ = hand_path_patch(model, p, (0, 1), None, None)
    torch.testing.assert_close(res.logits, want, atol=TOL, rtol=0)
    assert (res.values[0, 1] - res.base).abs().max() > 0.01  # the check can fail
    assert res.pattern_change[0, 1].abs().max() > 1e-3  # q moves the receiver's pattern
    assert res.pattern_change[2, 1].nan_to_num().abs().max() == 0  # v cannot
    slow = path_patching(model, p, LogitDiff(), (0, 1), fast=False)
    assert slow.meta["path"] == "bridge"
    torch.testing.assert_close(slow.values, res.values, atol=TOL, rtol=0, equal_nan=True)
    df = res.to_frame()
    assert set(df.receiver) == {"q", "k", "v", "logits"}


@pytest.mark.parametrize("comp", ["q", "k", "v"])
def test_path_patching_equals_transformer_lens_direct_path(gpt2, llama, comp):
    p = prompts()
    for model in (gpt2, llama) if comp == "q" else (gpt2,):  # TL refuses k/v under GQA
        _, clean = model.run_with_cache(p.tokens)
        _, corr = model.run_with_cache(p.corrupted)
        ref = tlp.get_act_patch_direct_path(model, p.corrupted, clean, corr,
                                            lambda logits: tl_metric(p)(logits).mean(),
                                            0, 2, component=comp, verbose=False)
        res = path_patching(model, p, LogitDiff(), (0, 2), receivers=(comp,))
        torch.testing.assert_close(res.values[0, 1].mean(-1), ref[1].cpu(), atol=TOL, rtol=0)


def tl_path_patch_frozen(model, p, sender, receiver, comp, frozen):
    """Path patching by hand with plain TransformerLens hooks, denoising, on a model of any
    depth. Run 1: the corrupted prompts with the sender's hook_z at its clean value, the hook_z
    of every head in the layers ``frozen`` and every hook_mlp_out at their corrupted values
    (heads of the other layers recompute from the patched residual); it records the
    receiver's hook_q/k/v (receiver None: run 1's own logits are the answer). Run 2: the
    corrupted prompts with only the receiver's hook_q/k/v replaced by the recorded one.
    Returns the metric per prompt and run 1's change of the residual the receiver reads
    (blocks.{layer}.hook_resid_pre, or ln_final's input for the logits)."""
    Ls, hs = sender
    L = model.cfg.n_layers
    _, clean = model.run_with_cache(p.tokens)
    _, corr = model.run_with_cache(p.corrupted)

    def z_hook(layer):
        def hook(z, hook):
            z = (corr[hook.name] if layer in frozen else z).clone()
            if layer == Ls:
                z[:, :, hs] = clean[hook.name][:, :, hs]
            return z
        return hook

    hooks = [(f"blocks.{layer}.attn.hook_z", z_hook(layer)) for layer in range(L)]
    hooks += [(f"blocks.{layer}.hook_mlp_out", lambda x, hook: corr[hook.name])
              for layer in range(L)]
    got = {}
    read = "ln_final.hook_in" if receiver is None else f"blocks.{receiver[0]}.hook_resid_pre"
    hooks.append((read, lambda x, hook: got.update(resid=x.clone())))
    if receiver is None:
        logits = model.run_with_hooks(p.corrupted, fwd_hooks=hooks)
        return tl_metric(p)(logits).detach(), (got["resid"] - corr[read]).detach()
    Lr, hr = receiver
    name = f"blocks.{Lr}.attn.hook_{comp}"
    hooks.append((name, lambda x, hook: got.update(x=x.clone())))
    model.run_with_hooks(p.corrupted, fwd_hooks=hooks)

    def patch(x, hook):
        x = x.clone()
        x[:, :, hr] = got["x"][:, :, hr]
        return x
    logits = model.run_with_hooks(p.corrupted, fwd_hooks=[(name, patch)])
    return tl_metric(p)(logits).detach(), (got["resid"] - corr[read]).detach()


@pytest.fixture(scope="module")
def gpt2_3():
    """A sharp 3-layer, 4-head GPT-2: a middle attention layer between sender and receiver."""
    return sharp_gpt2("patch-gpt2-3l", n_layer=3)


def test_path_patching_freezes_a_middle_attention_layer(gpt2_3):
    """Sender L0H0 -> receivers in layer 2 (q, k, v of every head, and the logits): the path is
    direct, so layer 1's heads (and every MLP) stay at their corrupted values. Equal to the
    hand-written reference with layer 1 frozen (and to TL's direct path patching); the same
    reference with layer 1's attention left to recompute gives other numbers on every
    receiver, so the freeze is what the check measures."""
    model, p = gpt2_3, prompts()
    sender, layers = (0, 0), {0, 1, 2}
    res = path_patching(model, p, LogitDiff(), sender)
    assert res.meta["path"] == "bare" and res.values.shape[1] == 3
    # the sender's write, from the HF weights: z [batch, pos, head, d_head] @ W_O[head]
    _, clean = model.run_with_cache(p.tokens)
    _, corr = model.run_with_cache(p.corrupted)
    zname = "blocks.0.attn.hook_z"
    dh = model.cfg.d_head
    W_O = model.original_model.transformer.h[0].attn.c_proj.weight[:dh]  # [d_head, d_model]
    write = ((clean[zname][:, :, 0] - corr[zname][:, :, 0]) @ W_O).detach()
    lo_free = float("inf")
    for c, comp in enumerate(res.components):
        for h in range(4):
            want, shift = tl_path_patch_frozen(model, p, sender, (2, h), comp, layers)
            torch.testing.assert_close(shift, write, atol=1e-4, rtol=0)  # the freeze is whole
            torch.testing.assert_close(res.values[c, 2, h], want, atol=TOL, rtol=0)
            assert (want - res.base).abs().max() > 100 * TOL, (comp, h)  # the check can fail
            free, free_shift = tl_path_patch_frozen(model, p, sender, (2, h), comp, {0, 2})
            assert (free_shift - write).abs().max() > 0.1  # layer 1 relays the sender
            lo_free = min(lo_free, float((free - res.values[c, 2, h]).abs().max()))
            want1, _ = tl_path_patch_frozen(model, p, sender, (1, h), comp, layers)
            torch.testing.assert_close(res.values[c, 1, h], want1, atol=TOL, rtol=0)
    want, shift = tl_path_patch_frozen(model, p, sender, None, None, layers)
    torch.testing.assert_close(shift, write, atol=1e-4, rtol=0)
    torch.testing.assert_close(res.logits, want, atol=TOL, rtol=0)
    assert (want - res.base).abs().max() > 100 * TOL
    free, _ = tl_path_patch_frozen(model, p, sender, None, None, {0, 2})
    lo_free = min(lo_free, float((free - res.logits).abs().max()))
    # not freezing layer 1 moves every receiver's number by far more than the tolerance
    assert lo_free > 100 * TOL, lo_free
    for comp in ("q", "k", "v"):  # TL's own direct path patching: the same, mean over prompts
        ref = tlp.get_act_patch_direct_path(model, p.corrupted, clean, corr,
                                            lambda logits: tl_metric(p)(logits).mean(),
                                            0, 0, component=comp, verbose=False)
        torch.testing.assert_close(res.values[res.components.index(comp), 1:].mean(-1),
                                   ref[1:].cpu(), atol=TOL, rtol=0)
    slow = path_patching(model, p, LogitDiff(), sender, fast=False)
    assert slow.meta["path"] == "bridge"
    torch.testing.assert_close(slow.values, res.values, atol=TOL, rtol=0, equal_nan=True)
    torch.testing.assert_close(slow.logits, res.logits, atol=TOL, rtol=0)


# ---- bad input ---------------------------------------------------------------------------
def test_bad_input_clear_errors(gpt2):
    p = prompts()
    with pytest.raises(PromptError, match="corrupted: expected the same shape"):
        PromptSet(tokens=p.tokens, corrupted=p.tokens[:, :5], answers=p.answers,
                  wrong=p.wrong)
    no_corr = PromptSet(tokens=p.tokens, answers=p.answers, wrong=p.wrong)
    with pytest.raises(ValueError, match="corrupted prompts"):
        activation_patching(gpt2, no_corr, LogitDiff())
    with pytest.raises(ValueError, match="sender: layer 5 out of range"):
        path_patching(gpt2, p, LogitDiff(), (5, 0))
    with pytest.raises(ValueError, match="sender: head 9 out of range"):
        path_patching(gpt2, p, LogitDiff(), (1, 9))
    with pytest.raises(ValueError, match="receivers"):
        path_patching(gpt2, p, LogitDiff(), (0, 0), receivers=("o",))
    with pytest.raises(ValueError, match="site: expected"):
        activation_patching(gpt2, p, LogitDiff(), site="mlp")
    with pytest.raises(ValueError, match="by: 'dest_src' applies to site='pattern'"):
        activation_patching(gpt2, p, LogitDiff(), site="z", by="dest_src")
    with pytest.raises(ValueError, match="direction"):
        activation_patching(gpt2, p, LogitDiff(), direction="sideways")
    scalar = LogitsMetric(lambda logits, q: tl_metric(q)(logits).mean(), name="mean_ld")
    with pytest.raises(MetricError, match=r"'mean_ld': returned shape \(\), expected \(4,\)"):
        activation_patching(gpt2, p, scalar)
    bert = build("bert")
    with pytest.raises(ModelError, match="pre-norm causal decoder"):
        path_patching(bert, p, LogitsMetric(lambda logits, q: tl_metric(q)(logits)), (0, 0))
