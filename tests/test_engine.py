"""Reference tests of the intervention engine: invariants and equality with plain TL hooks."""

import pytest
import torch

from lensattr.core.metrics import AnswerLogProb, KLToClean, LogitDiff, LogitsMetric
from lensattr.core.prompts import PromptSet
from lensattr.core.sites import Site, hook_name
from lensattr.core.types import HeadId
from lensattr.evidence import Engine, Intervention, ablate, keep_only, remove_direct, remove_sources
from lensattr.evidence.decomposition import head_output, per_source_terms
from lensattr.models.adapter import Adapter

HEADS = [HeadId(0, 1), HeadId(1, 2), HeadId(1, 3)]


@pytest.fixture(scope="module")
def engine(random_gpt2, random_prompts):
    return Engine(random_gpt2, random_prompts, LogitDiff(), progress=False)


def all_sources(prompts):
    n, p = prompts.tokens.shape
    return torch.ones(n, p, p, dtype=torch.bool)


def test_empty_intervention_changes_nothing(engine):
    res = engine.run([Intervention("nothing")])
    torch.testing.assert_close(res.values[0], engine.clean, atol=1e-6, rtol=0)


def test_empty_source_set_changes_nothing(engine, random_prompts):
    n, p = random_prompts.tokens.shape
    none = torch.zeros(n, p, p, dtype=torch.bool)
    res = engine.run([remove_sources(h, none, label=f"r{h}") for h in HEADS])
    for v in res.values:
        torch.testing.assert_close(v, engine.clean, atol=1e-6, rtol=0)


def test_remove_all_sources_equals_zero_ablation(engine, random_prompts):
    ivs = [remove_sources(h, all_sources(random_prompts), label=f"all{h}") for h in HEADS]
    ivs += [ablate(h) for h in HEADS]
    res = engine.run(ivs)
    for i in range(len(HEADS)):
        torch.testing.assert_close(res.values[i], res.values[i + len(HEADS)], atol=1e-6, rtol=0)
    assert not torch.allclose(res.values[0], engine.clean)  # the edit does something


def test_resample_with_clean_as_corrupted_changes_nothing(random_gpt2, random_prompts):
    same = PromptSet(
        tokens=random_prompts.tokens,
        corrupted=random_prompts.tokens,
        answers=random_prompts.answers,
        wrong=random_prompts.wrong,
    )
    eng = Engine(random_gpt2, same, LogitDiff(), progress=False)
    a = Adapter(random_gpt2)
    res = eng.run([ablate(*a.heads(), method="resample")])
    torch.testing.assert_close(res.values[0], eng.clean, atol=1e-6, rtol=0)


def test_batched_equals_one_at_a_time(random_gpt2, random_prompts):
    ivs = [ablate(h, method=m) for h in HEADS for m in ("zero", "mean", "resample")]
    ivs += [
        keep_only(h, torch.eye(9, dtype=torch.bool).expand(6, 9, 9), label=f"k{h}") for h in HEADS
    ]
    big = Engine(random_gpt2, random_prompts, LogitDiff(), batch_size=10_000, progress=False)
    one = Engine(random_gpt2, random_prompts, LogitDiff(), batch_size=1, progress=False)
    rb, ro = big.run(ivs, track_heads=True), one.run(ivs, track_heads=True)
    assert (rb.values - ro.values).abs().max() <= 1e-5
    assert (rb.head_delta - ro.head_delta).abs().max() <= 1e-5
    # the reference runs go batch_size prompts a forward too: the same references
    torch.testing.assert_close(one.clean, big.clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(one.corrupted, big.corrupted, atol=1e-5, rtol=0)
    torch.testing.assert_close(one.final_scale, big.final_scale, atol=1e-6, rtol=1e-6)
    for name in ("z", "patterns", "v", "z_corr", "patterns_corr", "v_corr"):
        for x, y in zip(getattr(one, name), getattr(big, name), strict=True):
            assert x.shape == y.shape and x.shape[0] == 6, name
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_head_delta_equals_plain_hook_reference(engine, random_gpt2, random_prompts):
    """head_delta[k, l, h] = mean over prompts of |z_h W_O^h (edited) - (clean)| at the read
    position, every head of every layer, computed here with plain TL hooks."""
    h = HeadId(0, 1)
    res = engine.run([ablate(h), Intervention("nothing")], track_heads=True)
    assert res.head_delta.shape == (2, random_gpt2.cfg.n_layers, random_gpt2.cfg.n_heads)
    end, rows = random_prompts.roles["END"], torch.arange(len(random_prompts))

    def outputs(edit: bool) -> torch.Tensor:  # [batch, layer, head, d_model] at END
        got = {}

        def zero(z, hook):
            z = z.clone()
            z[:, :, h.head] = 0.0
            return z

        def grab(z, hook):
            got[hook.layer()] = z[rows, end]

        hooks = [(hook_name(Site.Z, h.layer), zero)] if edit else []
        hooks += [(hook_name(Site.Z, li), grab) for li in range(random_gpt2.cfg.n_layers)]
        random_gpt2.run_with_hooks(random_prompts.tokens, fwd_hooks=hooks)
        W_O = random_gpt2.W_O  # [layer, head, d_head, d_model]
        return torch.stack([torch.einsum("bhd,hdm->bhm", got[li], W_O[li])
                            for li in sorted(got)], 1).detach()

    ref = (outputs(True) - outputs(False)).norm(dim=-1).mean(0)  # [layer, head]
    torch.testing.assert_close(res.head_delta[0], ref, atol=1e-5, rtol=0)
    assert ref[h.layer, h.head] > 0 and ref[1].abs().sum() > 0  # the reference can fail
    torch.testing.assert_close(res.head_delta[1], torch.zeros_like(ref), atol=1e-6, rtol=0)


def test_zero_ablation_equals_tl_hook(engine, random_gpt2, random_prompts):
    h = HeadId(1, 2)
    res = engine.run([ablate(h)])

    def zero(z, hook):  # TransformerLens hook: z is [batch, pos, head_index, d_head]
        z = z.clone()
        z[:, :, h.head] = 0.0
        return z

    logits = random_gpt2.run_with_hooks(
        random_prompts.tokens, fwd_hooks=[(hook_name(Site.Z, h.layer), zero)]
    )
    end = random_prompts.roles["END"]
    rows = torch.arange(len(random_prompts))
    ref = logits[rows, end, random_prompts.answers] - logits[rows, end, random_prompts.wrong]
    torch.testing.assert_close(res.values[0], ref.detach(), atol=1e-5, rtol=0)


def test_mean_ablation_uses_prompt_mean(engine, random_gpt2, random_prompts):
    h = HeadId(0, 3)
    res = engine.run([ablate(h, method="mean")])
    _, store = Adapter(random_gpt2).run_with_cache(random_prompts.tokens, sites=(Site.Z,))
    mean = store[(Site.Z, 0)][:, :, h.head].mean(0)  # [pos, d_head]

    def put_mean(z, hook):
        z = z.clone()
        z[:, :, h.head] = mean
        return z

    logits = random_gpt2.run_with_hooks(
        random_prompts.tokens, fwd_hooks=[(hook_name(Site.Z, 0), put_mean)]
    )
    rows, end = torch.arange(6), random_prompts.roles["END"]
    ref = logits[rows, end, random_prompts.answers] - logits[rows, end, random_prompts.wrong]
    torch.testing.assert_close(res.values[0], ref.detach(), atol=1e-5, rtol=0)


def test_removing_sources_subtracts_their_terms(random_gpt2, random_prompts):
    """Edge removal equals subtracting alpha*v*W_O terms (checked on the head's own output)."""
    a = Adapter(random_gpt2)
    h = HeadId(1, 1)
    terms = per_source_terms(a, random_prompts, h)  # [batch, q, k, d_model]
    out = head_output(a, random_prompts, h)  # [batch, pos, d_model]
    torch.testing.assert_close(terms.sum(2), out, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(3)
    S = torch.rand(6, 9, 9, generator=g) < 0.4
    store = {}

    def edit(p):
        p = p.clone()
        p[:, h.head] = p[:, h.head].masked_fill(S, 0.0)
        return p

    def grab(z):
        store["z"] = z

    a.forward(random_prompts.tokens, hooks={(Site.PATTERN, h.layer): edit, (Site.Z, h.layer): grab})
    edited = store["z"][:, :, h.head] @ a.W_O(h.layer)[h.head]
    expected = out - (terms * S[..., None]).sum(2)
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=0)


def test_declared_readout_equals_plain_callable(random_gpt2, random_prompts):
    def logit_diff(logits, prompts):
        rows = torch.arange(logits.shape[0])
        end = prompts.roles["END"]
        return logits[rows, end, prompts.answers] - logits[rows, end, prompts.wrong]

    def logprob(logits, prompts):
        rows = torch.arange(logits.shape[0])
        lp = logits[rows, prompts.roles["END"]].log_softmax(-1)
        return lp[rows, prompts.answers]

    ivs = [ablate(h, method="mean") for h in HEADS]
    for declared, plain in ((LogitDiff(), logit_diff), (AnswerLogProb(), logprob)):
        e1 = Engine(random_gpt2, random_prompts, declared, progress=False)
        e2 = Engine(random_gpt2, random_prompts, LogitsMetric(plain), progress=False)
        torch.testing.assert_close(e1.clean, e2.clean, atol=1e-5, rtol=0)
        torch.testing.assert_close(e1.run(ivs).values, e2.run(ivs).values, atol=1e-5, rtol=0)


def test_kl_to_clean_is_zero_on_clean(random_gpt2, random_prompts):
    e = Engine(random_gpt2, random_prompts, KLToClean(), progress=False)
    assert e.clean.abs().max() < 1e-6
    assert (e.run([ablate(HeadId(0, 0))]).values > 0).all()


def test_renormalised_knockout_with_no_mass_is_nan(engine, random_prompts):
    res = engine.run([remove_sources(HeadId(0, 0), all_sources(random_prompts), renormalise=True)])
    assert torch.isnan(res.values).all()
    n, p = random_prompts.tokens.shape
    some = torch.zeros(n, p, p, dtype=torch.bool)
    some[:, -1, 1] = True
    ok = engine.run([remove_sources(HeadId(0, 0), some, renormalise=True, label="renorm-one")])
    assert torch.isfinite(ok.values).all()


def test_direct_path_equals_hand_computation(engine, random_gpt2, random_prompts):
    """Removing a head's direct path with the final LayerNorm scale frozen, by hand."""
    a = Adapter(random_gpt2)
    h = HeadId(0, 2)
    res = engine.run([remove_direct(h)])
    out = head_output(a, random_prompts, h)  # [batch, pos, d_model]
    _, store = a.run_with_cache(random_prompts.tokens, sites=(Site.LN_FINAL_SCALE,))
    scale = store[(Site.LN_FINAL_SCALE, None)]  # [batch, pos, 1]
    rows, end = torch.arange(6), random_prompts.roles["END"]
    o = out[rows, end]
    centred = (o - o.mean(-1, keepdim=True)) / scale[rows, end]
    w = random_gpt2.ln_final.weight if hasattr(random_gpt2.ln_final, "weight") else None
    w = w if w is not None else a.model.original_model.transformer.ln_f.weight
    d_logit = (centred * w) @ a.model.W_U  # [batch, d_vocab]
    delta = d_logit[rows, random_prompts.answers] - d_logit[rows, random_prompts.wrong]
    assert delta.abs().max() > 1e-4  # the head does reach the readout
    torch.testing.assert_close(res.values[0], engine.clean - delta.detach(), atol=1e-5, rtol=0)


def test_checkpoint_resumes_without_recomputing(random_gpt2, random_prompts, tmp_path):
    ck = tmp_path / "ev.safetensors"
    ivs = [ablate(h) for h in HEADS]
    first = Engine(random_gpt2, random_prompts, LogitDiff(), checkpoint=ck, progress=False)
    r1 = first.run(ivs)
    assert ck.exists()
    again = Engine(random_gpt2, random_prompts, LogitDiff(), checkpoint=ck, progress=False)

    def boom(*a, **k):
        raise AssertionError("recomputed an intervention that was saved")

    again._run_chunk = boom
    torch.testing.assert_close(again.run(ivs).values, r1.values, atol=0, rtol=0)
    other = PromptSet(
        tokens=random_prompts.tokens.flip(0),
        answers=random_prompts.answers,
        wrong=random_prompts.wrong,
    )
    with pytest.warns(UserWarning, match="no saved result is reused.*differs in prompts"):
        fresh = Engine(random_gpt2, other, LogitDiff(), checkpoint=ck, progress=False)
    assert len(fresh._store) == 0  # a checkpoint of another run is not reused


def test_edge_edits_through_z_equal_pattern_edits(random_gpt2, random_prompts):
    """The hook_z route (used where the bridge discards pattern edits, e.g. BERT) gives the
    same numbers as editing hook_pattern, on a model where both are possible."""
    assert Adapter(random_gpt2).pattern_editable
    g = torch.Generator().manual_seed(7)
    S = torch.rand(6, 9, 9, generator=g) < 0.5
    ivs = [remove_sources(h, S, label=f"r{h}") for h in HEADS]
    ivs += [remove_sources(h, S, renormalise=True, label=f"n{h}") for h in HEADS]
    via_pattern = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False).run(ivs)
    probes = Adapter(random_gpt2)._probes
    probes["pattern_editable"] = False
    try:
        via_z = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False).run(ivs)
    finally:
        probes["pattern_editable"] = True
    torch.testing.assert_close(via_z.values, via_pattern.values, atol=1e-5, rtol=0,
                               equal_nan=True)
    assert not torch.allclose(via_pattern.values[0], via_pattern.values[3], equal_nan=True)


def test_checkpoint_not_shared_across_weights(random_gpt2, random_prompts, tmp_path):
    """Same config, other weights: the checkpoint of one must not be reused by the other."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lensattr.models.loading import boot_bridge

    from .conftest import word_tokenizer

    ck = tmp_path / "ev.safetensors"
    Engine(random_gpt2, random_prompts, LogitDiff(), checkpoint=ck, progress=False).run(
        [ablate(HEADS[0])])
    torch.manual_seed(123)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    other = boot_bridge(GPT2LMHeadModel(cfg), word_tokenizer(50), "random-gpt2")
    assert Adapter(other).config_hash() == Adapter(random_gpt2).config_hash()
    with pytest.warns(UserWarning, match=r"differs in model weights \(model weights: saved"):
        e = Engine(other, random_prompts, LogitDiff(), checkpoint=ck, progress=False)
    assert len(e._store) == 0 and "model config" not in e.checkpoint_reason
