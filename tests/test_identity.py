"""Identity of evidence (issue 12, item 12): results are keyed by what an intervention does and
by the run (config, weights, prompts, metric, engine parameters), never by a label; the weights
hash is bit for bit; a checkpoint that is not used says why and loses nothing."""

import dataclasses
import warnings

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

import lensattr
from lensattr.core.metrics import AnswerLogProb, LogitDiff, LogitsMetric
from lensattr.core.types import HeadId
from lensattr.evidence import (
    EdgeEdit,
    Engine,
    HeadAblation,
    Intervention,
    ablate,
    digest,
    remove_direct,
    remove_sources,
)
from lensattr.models.adapter import Adapter, ModelError
from lensattr.models.loading import boot_bridge

from .conftest import word_tokenizer

H = HeadId(1, 2)
# tiny prompt sets: the audits here check numbers, not verdicts
pytestmark = pytest.mark.filterwarnings("ignore:Too few prompts")


def tiny_gpt2(seed: int = 0):
    """A model of our own: these tests edit weights, so never the session fixture."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return boot_bridge(GPT2LMHeadModel(cfg), word_tokenizer(50), "random-gpt2")


def masks(seed: int, k: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(6, 9, 9, generator=g) < 0.4 for _ in range(k)]


def counting(engine):
    """Make ``engine`` record how many interventions each forward pass computes."""
    seen, inner = [], engine._run_chunk

    def run_chunk(ivs, track):
        seen.append(len(ivs))
        return inner(ivs, track)

    engine._run_chunk = run_chunk
    return seen


# ---- the digest ------------------------------------------------------------------------
def test_digest_is_what_the_intervention_does():
    m1, m2 = masks(0)
    assert remove_sources(H, m1, label="a").digest() == remove_sources(H, m1, label="b").digest()
    assert remove_sources(H, m1, label="a").digest() != remove_sources(H, m2, label="a").digest()
    assert (remove_sources(H, m1).digest()
            != remove_sources(H, m1, renormalise=True).digest())
    assert remove_sources(H, m1).digest() != remove_sources((1, 3), m1).digest()
    # the same True cells in another shape are another edit
    wide = torch.zeros(6, 9, 10, dtype=torch.bool)
    narrow = torch.zeros(6, 10, 9, dtype=torch.bool)
    assert EdgeEdit(H, wide).__class__ and digest(EdgeEdit(H, wide)) != digest(EdgeEdit(H, narrow))
    assert ablate(H).digest() != ablate(H, method="mean").digest()
    # order does not matter where the engine combines edits; multiplicity does
    assert ablate((0, 1), H).digest() == ablate(H, (0, 1)).digest()
    e1, e2 = EdgeEdit(H, m1), EdgeEdit((0, 0), m2)
    assert Intervention("x", edges=(e1, e2)).digest() == Intervention("y", edges=(e2, e1)).digest()
    assert remove_direct(H, H).digest() != remove_direct(H).digest()
    # a head ablated twice at one position is ambiguous, not silently ordered
    with pytest.raises(ValueError, match="ablates head L1H2 twice at the same positions"):
        ablate(H, H)
    a, b = torch.zeros(6, 9, dtype=torch.bool), torch.zeros(6, 9, dtype=torch.bool)
    a[:, 1], b[:, 2] = True, True
    split = Intervention("s", ablations=(HeadAblation(H, "zero", a), HeadAblation(H, "mean", b)))
    swapped = Intervention("t", ablations=split.ablations[::-1])
    assert split.digest() == swapped.digest()  # disjoint positions: the order is irrelevant


def test_digest_covers_fields_added_later():
    """Every field is part of the identity without any change to the digest code: the
    replacement baseline, and a field a subclass adds."""

    @dataclasses.dataclass(frozen=True, eq=False)
    class EdgeEditWithDraw(EdgeEdit):
        draw: int = 0  # e.g. which resample draw

    (m,) = masks(1, 1)
    zero, mean = EdgeEdit(H, m), EdgeEdit(H, m, baseline=lensattr.AblationMethod.MEAN)
    assert digest(zero) != digest(mean)
    assert Intervention("e", edges=(zero,)).digest() != Intervention("e", edges=(mean,)).digest()
    assert remove_direct(H).digest() != remove_direct(H, baseline="mean").digest()
    assert digest(EdgeEditWithDraw(H, m)) != digest(EdgeEditWithDraw(H, m, draw=1))
    assert digest(EdgeEditWithDraw(H, m)) != digest(zero)
    rows = torch.zeros(6, 9, dtype=torch.bool)
    rows[:, 3] = True
    assert ablate(H, rows=rows).digest() != ablate(H).digest()
    with pytest.raises(TypeError, match="digest: cannot fingerprint a object"):
        digest(object())


# ---- one engine: the in-memory cache ------------------------------------------------------
def test_same_label_other_mask_gets_other_numbers(random_gpt2, random_prompts):
    m1, m2 = masks(2)
    e = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False)
    first = e.run([remove_sources(H, m1, label="edge@0")]).values[0]
    second = e.run([remove_sources(H, m2, label="edge@0")]).values[0]
    fresh = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False)
    torch.testing.assert_close(second, fresh.run([remove_sources(H, m2)]).values[0],
                               atol=1e-6, rtol=0)
    assert not torch.allclose(first, second)


def test_same_intervention_other_labels_computed_once(random_gpt2, random_prompts):
    (m,) = masks(3, 1)
    e = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False)
    seen = counting(e)
    res = e.run([remove_sources(H, m, label="a"), remove_sources(H, m, label="b"), ablate(H)])
    assert sum(seen) == 2 and res.n_reused == 1
    torch.testing.assert_close(res["a"], res["b"], atol=0, rtol=0)
    again = e.run([ablate(H, label="zero:1.2")])  # another label, same edit: from memory
    assert sum(seen) == 2 and again.n_reused == 1
    assert again.digests == [ablate(H).digest()]


# ---- checkpoints ---------------------------------------------------------------------------
def sweep(seed: int = 4):
    ivs = [ablate(h, method=m) for h in [(0, 0), (0, 3), (1, 1)] for m in ("zero", "mean")]
    ivs += [remove_sources(H, m, label=f"edge@{j}") for j, m in enumerate(masks(seed, 4))]
    return ivs


def test_interrupted_sweep_resumes_with_exactly_the_saved_rows(random_gpt2, random_prompts,
                                                               tmp_path):
    ck = tmp_path / "ev.safetensors"
    ivs = sweep()
    full = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False).run(ivs)
    # batch_size 12 = two interventions of 6 prompts a chunk; stop after two chunks
    first = Engine(random_gpt2, random_prompts, LogitDiff(), batch_size=12, checkpoint=ck,
                   progress=False)
    inner, calls = first._run_chunk, []

    def interrupted(chunk, track):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(chunk))
        return inner(chunk, track)

    first._run_chunk = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.run(ivs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same run: the checkpoint is used without a word
        again = Engine(random_gpt2, random_prompts, LogitDiff(), batch_size=12, checkpoint=ck,
                       progress=False)
    seen = counting(again)
    res = again.run(ivs)
    assert sum(seen) == len(ivs) - 4 and res.n_reused == 4
    torch.testing.assert_close(res.values, full.values, atol=1e-6, rtol=0)
    # a later run with changed masks under the same labels recomputes exactly those
    changed = sweep(seed=5)
    third = Engine(random_gpt2, random_prompts, LogitDiff(), checkpoint=ck, progress=False)
    seen = counting(third)
    res = third.run(changed)
    assert sum(seen) == 4  # the four edge@j
    ref = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False).run(changed)
    torch.testing.assert_close(res.values, ref.values, atol=1e-6, rtol=0)


def test_audit_with_other_claims_does_not_reuse_positional_labels(random_gpt2, random_prompts,
                                                                  tmp_path):
    """Same model, prompts and metric, other claims (patterns from another cache): the labels
    keep:L.H and edge@j name other masks, and the resumed audit must not reuse them."""
    ck = str(tmp_path / "ev.safetensors")
    kw = dict(progress=False, n_boot=50, max_edge_sources=3)
    lensattr.audit(random_gpt2, random_prompts, LogitDiff(), checkpoint=ck, **kw)
    a = Adapter(random_gpt2)
    _, store = a.run_with_cache(random_prompts.tokens)
    flipped = {}  # each layer's patterns of the prompts in reverse order: other claims
    for (site, layer), t in store.items():
        from lensattr.core.sites import hook_name

        flipped[hook_name(site, layer)] = t.flip(0) if site.value == "pattern" else t
    resumed = lensattr.audit(random_gpt2, random_prompts, LogitDiff(), cache=flipped,
                             checkpoint=ck, **kw)
    fresh = lensattr.audit(random_gpt2, random_prompts, LogitDiff(), cache=flipped, **kw)
    for col in ("knockout_claimed", "knockout_unclaimed", "routing"):
        torch.testing.assert_close(torch.tensor(resumed.heads[col].to_numpy()),
                                   torch.tensor(fresh.heads[col].to_numpy()),
                                   atol=1e-6, rtol=0, equal_nan=True)
    torch.testing.assert_close(torch.tensor(resumed.edges["effect_remove"].to_numpy()),
                               torch.tensor(fresh.edges["effect_remove"].to_numpy()),
                               atol=1e-6, rtol=0, equal_nan=True)


def test_unused_checkpoint_says_why_and_keeps_its_entries(random_gpt2, random_prompts,
                                                          tmp_path):
    ck = tmp_path / "ev.safetensors"
    ivs = sweep()[:3]
    Engine(random_gpt2, random_prompts, LogitDiff(), checkpoint=ck, progress=False).run(ivs)
    with pytest.warns(UserWarning, match=r"no saved result is reused.*differs in metric \("):
        other = Engine(random_gpt2, random_prompts, AnswerLogProb(), checkpoint=ck,
                       progress=False)
    assert other.checkpoint_reason.startswith("it holds results of 1 other run")
    other.run(ivs)  # saves beside the first run's results
    back = Engine(random_gpt2, random_prompts, LogitDiff(), checkpoint=ck, progress=False)
    seen = counting(back)
    assert back.run(ivs).n_reused == 3 and sum(seen) == 0  # nothing was thrown away


def test_callables_with_one_name_do_not_share_results(random_gpt2, random_prompts, tmp_path):
    def metric_a(logits, prompts):
        return logits[:, -1, 1]

    def metric_b(logits, prompts):
        return logits[:, -1, 2]

    ck = tmp_path / "ev.safetensors"
    a = Engine(random_gpt2, random_prompts, LogitsMetric(metric_a, name="m"), checkpoint=ck,
               progress=False)
    a.run([ablate(H)])
    with pytest.warns(UserWarning, match="differs in metric"):
        b = Engine(random_gpt2, random_prompts, LogitsMetric(metric_b, name="m"),
                   checkpoint=ck, progress=False)
    assert a.run_parts["metric"] != b.run_parts["metric"]
    same = Engine(random_gpt2, random_prompts, LogitsMetric(metric_a, name="m"), progress=False)
    assert same.run_key == a.run_key


def test_old_or_unreadable_checkpoints_are_kept(random_gpt2, random_prompts, tmp_path):
    old = tmp_path / "old.safetensors"
    save_file({"0123abcd": torch.zeros(6)}, str(old), metadata={"run_key": "feedbeef"})
    with pytest.warns(UserWarning, match="older lensattr that keyed results by label"):
        e = Engine(random_gpt2, random_prompts, LogitDiff(), checkpoint=old, progress=False)
    e.run([ablate(H)])
    from safetensors import safe_open

    with safe_open(str(old), "pt") as f:
        assert "0123abcd" in set(f.keys())  # the old entry is still there
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{trunc")
    with pytest.warns(UserWarning, match="unreadable.*moved to"):
        Engine(random_gpt2, random_prompts, LogitDiff(), checkpoint=bad, progress=False)
    assert list(tmp_path.glob("bad.safetensors.unreadable-*"))


# ---- the weights hash ----------------------------------------------------------------------
def test_weights_hash_sees_in_place_edits_and_invalidates_probes(random_prompts):
    model = tiny_gpt2()
    a = Adapter(model)
    h0 = a.weights_hash()
    assert a.pattern_editable
    Adapter(model)._probes["pattern_editable"] = False  # a probe result for these weights
    assert Adapter(model).pattern_editable is False
    w = model.blocks[0].attn.o.weight if hasattr(model.blocks[0].attn, "o") else None
    w = w if w is not None else next(model.parameters())
    saved = w.detach().clone()
    with torch.no_grad():
        w[0, 0] += 1.0  # in place, bumps the version counter
    h1 = Adapter(model).weights_hash()
    assert h1 != h0
    assert Adapter(model).pattern_editable is True  # probed again for the new weights
    w.data[0, 1] += 1.0  # through .data: no version bump, still seen bit for bit
    assert Adapter(model).weights_hash() not in (h0, h1)
    with torch.no_grad():
        w.copy_(saved)
    assert Adapter(model).weights_hash() == h0  # same bits, same hash


def test_engine_refuses_weights_changed_under_it(random_prompts):
    model = tiny_gpt2()
    e = Engine(model, random_prompts, LogitDiff(), progress=False)
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    with pytest.raises(ModelError, match="weights changed after this Engine was built"):
        e.run([ablate(H)])


def test_weights_hash_same_under_one_and_two_threads():
    """The old fingerprint summed floats, which changed with the thread count on a real model;
    raw bytes do not. A model big enough for the sums to be split across threads."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=4096, n_positions=64, n_embd=256, n_layer=2, n_head=4)
    model = boot_bridge(GPT2LMHeadModel(cfg), word_tokenizer(4096), "threads-gpt2")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = Adapter(model).weights_hash()
        torch.set_num_threads(2)
        two = Adapter(model).weights_hash()
    finally:
        torch.set_num_threads(before)
    assert one == two


def test_same_weights_other_object_share_the_hash():
    assert Adapter(tiny_gpt2(3)).weights_hash() == Adapter(tiny_gpt2(3)).weights_hash()
    assert Adapter(tiny_gpt2(3)).weights_hash() != Adapter(tiny_gpt2(4)).weights_hash()
