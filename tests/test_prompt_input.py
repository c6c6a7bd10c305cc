"""Prompt-level input: END under padding, integer answers and roles, the corrupted prompts'
own mask, the model's context length, n_prompts with a PromptSet, and the positions a
metric reads."""

import pytest
import torch

import lensattr
from lensattr.core.metrics import HiddenCosineToClean, LogitDiff, LogitsMetric, PairCosine
from lensattr.core.prompts import PromptError, PromptSet
from lensattr.evidence import Engine
from lensattr.models.adapter import Adapter


def padded(side: str) -> PromptSet:
    """Two prompts of 5 positions: the first has 3 real tokens, padded on ``side``."""
    mask = torch.ones(2, 5, dtype=torch.long)
    if side == "left":
        mask[0, :2] = 0
    else:
        mask[0, 3:] = 0
    return PromptSet(tokens=torch.arange(1, 11).reshape(2, 5), attention_mask=mask,
                     answers=[1, 2], wrong=[3, 4])


@pytest.mark.parametrize("side, end", [("left", [4, 4]), ("right", [2, 4])])
def test_end_is_the_last_real_token(side, end):
    p = padded(side)
    assert p.roles["END"].tolist() == end
    assert p.last_real.tolist() == end
    assert p.lengths.tolist() == [3, 5]


def test_end_under_left_padding_is_read_by_the_metric(random_gpt2):
    """The clean metric under left padding reads the last real token: the model's own logits
    there (logit difference), not those of a position inside the prompt."""
    g = torch.Generator().manual_seed(3)
    toks = torch.randint(1, 50, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    toks[0, :2] = 0
    p = PromptSet(tokens=toks, attention_mask=mask, answers=[5, 6], wrong=[7, 8])
    e = Engine(random_gpt2, p, LogitDiff(), progress=False)
    logits = Adapter(random_gpt2).forward(toks, mask)[:, -1]  # [batch, d_vocab]
    want = logits[[0, 1], [5, 6]] - logits[[0, 1], [7, 8]]
    torch.testing.assert_close(e.clean, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw, arg", [
    (dict(answers=[1.5, 2.0], wrong=[3, 4]), "answers"),
    (dict(answers=[1, 2], wrong=torch.tensor([3.0, 4.0])), "wrong"),
    (dict(roles={"S1": [1.7, 2]}), r"roles\['S1'\]"),
    (dict(roles={"S1": torch.tensor([1.0, 2.0])}), r"roles\['S1'\]"),
    (dict(roles={"S1": 1.0}), r"roles\['S1'\]"),
    (dict(roles={"S1": torch.tensor([True, False])}), r"roles\['S1'\]"),
    (dict(roles={"S1": ["a", "b"]}), r"roles\['S1'\]"),
])
def test_non_integer_answers_and_roles_are_refused(kw, arg):
    with pytest.raises(PromptError, match=arg + ": expected integers"):
        PromptSet(tokens=torch.zeros(2, 4, dtype=torch.long), **kw)


def test_integer_answers_and_roles_of_any_integer_kind():
    import numpy as np

    p = PromptSet(tokens=torch.zeros(2, 4, dtype=torch.long), answers=np.array([1, 2]),
                  wrong=torch.tensor([3, 4], dtype=torch.int32), roles={"S1": 1, "S2": [2, 3]})
    assert p.answers.dtype == torch.long and p.roles["S1"].tolist() == [1, 1]


def test_role_on_padding_is_refused():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(PromptError, match=r"roles\['S'\]: position 0 of prompt 0 is padding"):
        PromptSet(tokens=torch.zeros(2, 3, dtype=torch.long), attention_mask=mask,
                  roles={"S": 0})


def test_float_mask_with_other_values_is_refused_not_truncated():
    with pytest.raises(PromptError, match="attention_mask: expected 0/1 values"):
        PromptSet(tokens=torch.zeros(1, 3, dtype=torch.long),
                  attention_mask=torch.tensor([[1.0, 0.5, 1.0]]))


# ---- the corrupted prompts' own attention mask --------------------------------------------
def corrupted_padded(random_prompts) -> PromptSet:
    """The fixture's prompts, with corrupted prompts whose first token is padding."""
    cmask = torch.ones_like(random_prompts.tokens)
    cmask[:, 0] = 0
    rp = random_prompts
    return PromptSet(tokens=rp.tokens, corrupted=rp.corrupted, corrupted_attention_mask=cmask,
                     answers=rp.answers, wrong=rp.wrong, roles={"S": 2})


def test_corrupted_mask_defaults_to_the_clean_mask(random_prompts):
    assert random_prompts.corrupted_attention_mask is None  # no padding anywhere
    p = padded("right")
    q = PromptSet(tokens=p.tokens, attention_mask=p.attention_mask, corrupted=p.tokens)
    assert torch.equal(q.corrupted_attention_mask, p.attention_mask)
    assert torch.equal(q.corrupted_view().attention_mask, p.attention_mask)


def test_corrupted_mask_is_validated_carried_and_hashed(random_prompts):
    p = corrupted_padded(random_prompts)
    assert p.corrupted_attention_mask[:, 0].eq(0).all()
    sub = p.take(torch.tensor([1, 3]))
    assert torch.equal(sub.corrupted_attention_mask, p.corrupted_attention_mask[[1, 3]])
    assert p.hash() != random_prompts.hash()
    view = p.corrupted_view()
    assert torch.equal(view.tokens, p.corrupted) and torch.equal(view.attention_mask,
                                                                p.corrupted_attention_mask)
    with pytest.raises(PromptError, match=r"corrupted_attention_mask: expected shape \(6, 9\)"):
        PromptSet(tokens=p.tokens, corrupted=p.corrupted,
                  corrupted_attention_mask=torch.ones(6, 8))
    with pytest.raises(PromptError, match="corrupted_attention_mask: given without corrupted"):
        PromptSet(tokens=p.tokens, corrupted_attention_mask=torch.ones(6, 9))
    with pytest.raises(PromptError, match=r"roles\['S'\]: .* padding in corrupted_attention_mask"):
        PromptSet(tokens=p.tokens, corrupted=p.corrupted, roles={"S": 0},
                  corrupted_attention_mask=p.corrupted_attention_mask)


def test_engine_runs_the_corrupted_prompts_with_their_own_mask(random_gpt2, random_prompts):
    p = corrupted_padded(random_prompts)
    e = Engine(random_gpt2, p, LogitDiff(), progress=False)
    logits = Adapter(random_gpt2).forward(p.corrupted, p.corrupted_attention_mask)[:, -1]
    rows = torch.arange(len(p))
    want = logits[rows, p.answers] - logits[rows, p.wrong]
    torch.testing.assert_close(e.corrupted, want, atol=1e-4, rtol=0)
    unmasked = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False).corrupted
    assert not torch.allclose(e.corrupted, unmasked, atol=1e-3)  # the mask mattered


# ---- context length ------------------------------------------------------------------------
def test_prompt_longer_than_the_context_is_refused(random_gpt2):
    long = PromptSet(tokens=torch.ones(2, 40, dtype=torch.long), answers=[1, 2], wrong=[3, 4])
    with pytest.raises(PromptError, match=r"40 positions .* n_ctx = 32"):
        Engine(random_gpt2, long, LogitDiff(), progress=False)
    long.validate_length(None)  # unknown context: nothing to check
    long.validate_length(40)


# ---- n_prompts with a PromptSet: the first n ---------------------------------------------
def test_n_prompts_with_a_promptset_takes_the_first_n(random_gpt2, random_prompts):
    r = lensattr.audit(random_gpt2, random_prompts, LogitDiff(), n_prompts=3, progress=False,
                       n_boot=20, heads=[(0, 0)])
    assert r.meta["n_prompts"] == 3
    assert r.meta["prompts_hash"] == random_prompts.take(torch.arange(3)).hash()
    with pytest.raises(PromptError, match=r"n_prompts: expected 1\.\.6 .* got 7"):
        lensattr.audit(random_gpt2, random_prompts, LogitDiff(), n_prompts=7, progress=False)
    with pytest.raises(PromptError, match="n_prompts: expected an integer"):
        random_prompts.first(2.5)
    assert random_prompts.first(None) is random_prompts


def test_task_n_prompts_must_be_an_integer():
    with pytest.raises(ValueError, match="n_prompts: expected an integer, got 2.5"):
        lensattr.tasks.get("planted-copy").prompts(2.5)


# ---- the positions a metric reads ---------------------------------------------------------
def test_read_positions():
    p = padded("left")
    p = PromptSet(tokens=p.tokens, attention_mask=p.attention_mask, answers=p.answers,
                  wrong=p.wrong, roles={"TOK": [3, 1]},
                  extra={"pair_embedding": torch.zeros(2, 4)})
    end = LogitDiff().read_positions(p)
    assert end.dtype == torch.bool and end.shape == (2, 5)
    assert end.nonzero().tolist() == [[0, 4], [1, 4]]
    tok = HiddenCosineToClean("TOK").read_positions(p)
    assert tok.nonzero().tolist() == [[0, 3], [1, 1]]
    pooled = PairCosine().read_positions(p)
    assert torch.equal(pooled, p.valid) and pooled[0].tolist() == [False, False, True, True, True]
    anything = LogitsMetric(lambda logits, prompts: logits[:, -1, 0]).read_positions(p)
    assert torch.equal(anything, p.valid)
