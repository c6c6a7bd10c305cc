"""Weights-only edge edits (``patch_weights``: pattern patching of chosen entries, the run's
values kept) against independent references: TransformerLens-convention pattern patching
(``activation_patching(site="pattern")``, noising), a hand-written bridge hook for the mean
baseline, and the hook_z route (models whose hook_pattern edits are discarded) against the
pattern route. Bad combinations are refused by name."""

import pytest
import torch

from lensattr.core.metrics import LogitDiff
from lensattr.core.sites import Site
from lensattr.core.types import HeadId
from lensattr.evidence import Engine, activation_patching
from lensattr.evidence.interventions import EdgeEdit, Intervention, patch_weights, remove_sources
from lensattr.models.adapter import Adapter

from .conftest import sharp_gpt2
from .test_architectures import build, prompts


def _fresh_gpt2():
    """A new sharp GPT-2 each call (one test rewrites its probe store)."""
    return sharp_gpt2("route-gpt2", seed=3, tie_word_embeddings=True)


def _entries(n, p, q, s):
    e = torch.zeros(n, p, p, dtype=torch.bool)
    e[:, q, s] = True
    return e


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_single_entries_equal_tl_pattern_patching(family):
    model = _fresh_gpt2() if family == "gpt2" else build(family)
    ps = prompts()
    n, p = len(ps), ps.n_pos
    ref = activation_patching(model, ps, LogitDiff(), site="pattern", by="dest_src",
                              direction="noising")  # [layer, head, dest, src, batch]
    eng = Engine(model, ps, LogitDiff(), progress=False)
    assert eng.fast
    a = eng.adapter
    cells = [(h, q, s) for h in a.heads() for q in (2, p - 1) for s in range(q + 1)]
    ivs = [patch_weights(h, _entries(n, p, q, s), label=f"{h}@{q},{s}") for h, q, s in cells]
    got = eng.run(ivs).values
    want = torch.stack([ref.values[h.layer, h.head, q, s] for h, q, s in cells])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    # not vacuous: some entries move the metric, and differ from removing the edge
    assert (got - eng.clean).abs().max() > 0.05 * eng.clean.abs().max()
    rem = eng.run([remove_sources(h, _entries(n, p, q, s), baseline="resample",
                                  label=f"rm{h}@{q},{s}") for h, q, s in cells]).values
    assert (rem - got).abs().max() > 0.05 * eng.clean.abs().max()


def test_whole_pattern_equals_all_position_patching():
    model, ps = _fresh_gpt2(), prompts()
    n, p = len(ps), ps.n_pos
    ref = activation_patching(model, ps, LogitDiff(), site="pattern", by="all",
                              direction="noising")
    allowed = torch.ones(p, p, dtype=torch.bool).tril()[None].expand(n, p, p)
    for fast in (True, False):
        eng = Engine(model, ps, LogitDiff(), progress=False, fast=fast)
        heads = eng.adapter.heads()
        got = eng.run([patch_weights(h, allowed, label=str(h)) for h in heads]).values
        want = torch.stack([ref.values[h.layer, h.head] for h in heads])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        assert (got - eng.clean).abs().max() > 0.05 * eng.clean.abs().max()


def test_mean_baseline_equals_a_hand_written_hook():
    ps = prompts()
    n, p = len(ps), ps.n_pos
    a = Adapter(_fresh_gpt2())
    eng = Engine(a, ps, LogitDiff(), progress=False)
    h, q = HeadId(1, 2), p - 1
    entries = torch.zeros(n, p, p, dtype=torch.bool)
    entries[:, q, [0, 2, 5]] = True
    got = eng.run([patch_weights(h, entries, baseline="mean", label="m")]).values[0]
    mean_row = eng.patterns[h.layer][:, h.head, q].mean(0)  # [key]

    def hook(pattern):  # [batch, head, q, k]
        pattern = pattern.clone()
        for s in (0, 2, 5):
            pattern[:, h.head, q, s] = mean_row[s]
        return pattern

    raw = a.read(ps.tokens, ps.attention_mask, eng.readout, {(Site.PATTERN, h.layer): hook})
    want = LogitDiff().compute(raw.float(), ps, eng.clean_values.float())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert (got - eng.clean).abs().max() > 0.01 * eng.clean.abs().max()


def test_hook_z_route_equals_the_pattern_route():
    """Models that discard hook_pattern edits take the hook_z route; forced on GPT-2 it must
    give the pattern route's numbers (both baselines, one entry and whole rows)."""
    ps = prompts()
    n, p = len(ps), ps.n_pos
    ivs = []
    for h in (HeadId(0, 1), HeadId(1, 3)):
        for b in ("resample", "mean"):
            ivs.append(patch_weights(h, _entries(n, p, p - 1, 2), baseline=b, label=f"{h}{b}1"))
            row = torch.zeros(n, p, p, dtype=torch.bool)
            row[:, 4, :5] = True
            ivs.append(patch_weights(h, row, baseline=b, label=f"{h}{b}row"))
    routes = {}
    for editable in (True, False):
        a = Adapter(_fresh_gpt2())
        a._probe_store()["pattern_editable"] = editable
        routes[editable] = Engine(a, ps, LogitDiff(), progress=False, fast=False).run(ivs).values
    clean = Engine(a, ps, LogitDiff(), progress=False).clean
    assert (routes[True] - clean).abs().max() > 0.05 * clean.abs().max()
    torch.testing.assert_close(routes[False], routes[True], atol=2e-5, rtol=0)


def test_bad_combinations_are_refused(random_gpt2, random_prompts):
    ps, n, p = random_prompts, len(random_prompts), random_prompts.n_pos
    e = _entries(n, p, p - 1, 1)
    with pytest.raises(ValueError, match="weights_only: needs a replacement baseline"):
        patch_weights((0, 0), e, baseline="zero")
    eng = Engine(random_gpt2, ps, LogitDiff(), progress=False)
    both = Intervention("both", edges=(
        EdgeEdit(HeadId(0, 0), e, renormalise=True),
        EdgeEdit(HeadId(0, 0), _entries(n, p, p - 1, 2), baseline="resample",
                 weights_only=True)))
    with pytest.raises(ValueError, match="renormalises .*weights_only"):
        eng.run([both])


def test_digest_of_edits_without_weights_only_is_unchanged():
    """Checkpoints written before ``weights_only`` existed keep their keys: the field is left
    out of the digest at its default (this digest was computed before the field was added)."""
    r = torch.zeros(2, 3, 3, dtype=torch.bool)
    r[:, 2, 1] = True
    iv = remove_sources((1, 0), r, baseline="resample", label="x")
    assert iv.digest() == "742188ad470177591d7839a2bdde37c3"
    w = patch_weights((1, 0), r, baseline="resample", label="x")
    assert w.digest() != iv.digest()
