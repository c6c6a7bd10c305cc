"""One baseline per verdict: edge edits under resample and mean baselines, row-limited
ablations, sinks and read positions (issue 12, items 4, 7, 9 and 10)."""

import pytest
import torch

import lensattr
from lensattr.auditing.columns import source_positions
from lensattr.auditing.plan import baselines as _baselines
from lensattr.auditing.plan import with_bos_role as _with_bos_role
from lensattr.claims import compute_claims, type_scores
from lensattr.claims.head_types import label_types, sink_mask
from lensattr.core.metrics import LogitDiff
from lensattr.core.prompts import PromptSet
from lensattr.core.types import AblationMethod, HeadId
from lensattr.evidence import Engine, ablate, remove_sources

HEADS = [HeadId(0, 1), HeadId(1, 2)]


def _all_sources(p: PromptSet):
    n, q = p.tokens.shape
    return torch.ones(n, q, q, dtype=torch.bool).tril()


@pytest.mark.parametrize("method", ["resample", "mean"])
def test_removing_every_source_under_a_baseline_equals_ablating_the_head(
    random_gpt2, random_prompts, method
):
    """alpha*v terms of every source replaced by their baseline counterparts == the head's
    output replaced by the baseline: edits and ablations share one baseline exactly."""
    e = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False)
    S = _all_sources(random_prompts)
    ivs = [remove_sources(h, S, baseline=method, label=f"edge{h}") for h in HEADS]
    ivs += [ablate(h, method=method, label=f"abl{h}") for h in HEADS]
    v = e.run(ivs).values
    torch.testing.assert_close(v[:2], v[2:], atol=1e-5, rtol=0)
    assert not torch.allclose(v[2:], e.clean[None].expand(2, -1), atol=1e-3)  # it did something


def test_baseline_edge_on_empty_mask_changes_nothing(random_gpt2, random_prompts):
    e = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False)
    none = torch.zeros_like(_all_sources(random_prompts))
    v = e.run([remove_sources(HEADS[0], none, baseline="resample")]).values
    torch.testing.assert_close(v[0], e.clean, atol=1e-5, rtol=0)


def test_row_limited_ablation(random_gpt2, random_prompts):
    e = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False)
    n, p = random_prompts.tokens.shape
    every = torch.ones(n, p, dtype=torch.bool)
    late = torch.zeros(n, p, dtype=torch.bool)
    late[:, -1] = True
    v = e.run([
        ablate(HEADS[0], method="resample", label="all"),
        ablate(HEADS[0], method="resample", rows=every, label="rows-all"),
        ablate(HEADS[0], method="resample", rows=~every, label="rows-none"),
        ablate(HEADS[1], method="zero", rows=late, label="last-row"),
    ]).values
    torch.testing.assert_close(v[0], v[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(v[2], e.clean, atol=1e-5, rtol=0)
    assert not torch.allclose(v[3], e.clean, atol=1e-4)  # the read row is the last one


def test_renormalise_refuses_a_replacement_baseline():
    with pytest.raises(ValueError, match="renormalise: only defined for the zero baseline"):
        remove_sources((0, 0), torch.ones(1, 2, 2, dtype=torch.bool), renormalise=True,
                       baseline="resample")


def test_mean_ablation_refused_on_unaligned_prompts(random_gpt2, random_prompts):
    p = random_prompts
    mask = torch.ones_like(p.tokens)
    mask[0, -2:] = 0  # right padding: prompts of two lengths
    padded = PromptSet(tokens=p.tokens, attention_mask=mask, corrupted=p.corrupted,
                       answers=p.answers, wrong=p.wrong)
    e = Engine(random_gpt2, padded, LogitDiff(), progress=False)
    with pytest.raises(ValueError, match="mean ablation .* needs aligned prompts"):
        e.run([ablate(HEADS[0], method="mean")])
    methods, primary = _baselines(padded, None)
    assert AblationMethod.MEAN not in methods and primary == AblationMethod.RESAMPLE
    with pytest.raises(ValueError, match="ablation: 'mean' needs aligned prompts"):
        _baselines(padded, "mean")


def test_no_sink_role_means_no_sink_and_bos_added_only_when_it_is_bos(random_gpt2):
    toks = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])  # token 0 is this tokenizer's BOS
    p = PromptSet(tokens=toks)
    assert not sink_mask(p).any()  # no role named: no sink invented
    a = lensattr.Adapter(random_gpt2)
    assert _with_bos_role(p, a).roles["BOS"].tolist() == [0, 0]
    content_first = PromptSet(tokens=toks[:, 1:])
    assert "BOS" not in _with_bos_role(content_first, a).roles  # never names content "BOS"


def test_induction_head_resting_on_bos_is_typed_induction():
    """A real model's induction head attends BOS on the first half (no earlier copy) and the
    token after the earlier copy on the second half: it is an induction head, not a sink."""
    toks = torch.tensor([[0, 11, 12, 13, 11, 12, 13]])
    p = PromptSet(tokens=toks, roles={"BOS": 0})
    P = torch.zeros(1, 1, 1, 7, 7)
    for q in range(4):
        P[0, 0, 0, q, 0] = 1.0  # first half rests on BOS
    for q, k in ((4, 2), (5, 3), (6, 4)):
        P[0, 0, 0, q, k] = 0.9
        P[0, 0, 0, q, 0] = 0.1
    s = type_scores(P, p)
    assert s["induction"].item() == pytest.approx(0.9)  # only where induction is possible
    assert s["sink"].item() > 0.5  # it does rest on BOS most of the time ...
    labels, _ = label_types(s)
    assert labels[0][0] == "induction"  # ... but its type is the specific pattern


def test_type_at_the_read_position():
    toks = torch.tensor([[0, 11, 12, 13, 14, 15]])
    p = PromptSet(tokens=toks, roles={"BOS": 0})
    P = torch.zeros(1, 1, 1, 6, 6)
    P[0, 0, 0, :5, 0] = 1.0  # every other row rests on BOS
    P[0, 0, 0, 5, 4] = 1.0  # the read row attends the previous token
    c = compute_claims([P[:, 0]], p, torch.tensor([5]))
    assert c.head_type[0][0] == "sink"
    assert c.head_type_read[0][0] == "previous_token"
    assert bool(c.striking[0, 0])


def test_pooled_read_rows_and_encoder_sources_include_later_keys():
    toks = torch.tensor([[1, 5, 6, 7, 2]])
    p = PromptSet(tokens=toks, roles={"CLS": 0, "SEP": 4, "TOK": 2})
    P = torch.full((1, 1, 5, 5), 0.2)
    read = torch.zeros(1, 5, dtype=torch.bool)
    read[0, 2] = True
    c = compute_claims([P], p, read, causal=False)
    src, names = source_positions(p, c, c.read_pos, 24)
    assert [int(s[0]) for s in src] == [0, 1, 2, 3, 4]  # keys after the read position too
    assert names[0] == "CLS" and names[4] == "SEP"
    pooled = compute_claims([P], p, p.valid, causal=False)
    assert pooled.read_rows.all() and int(pooled.read_pos[0]) == 4


def test_left_padded_read_rows_follow_the_metric(random_gpt2):
    """The read rows come from the metric's own positions, so a left-padded END is read where
    the prompt ends."""
    toks = torch.tensor([[0, 0, 3, 4, 5], [0, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    p = PromptSet(tokens=toks, attention_mask=mask, answers=[3, 3], wrong=[4, 4],
                  roles={"END": [4, 4]})
    from lensattr.core.metrics import read_rows as _read_rows

    rows = _read_rows(LogitDiff(), p)
    assert rows.nonzero().tolist() == [[0, 4], [1, 4]]
