"""Claims and statistics against hand-computed values (and TransformerLens where it has one)."""

import math

import pytest
import torch
from transformer_lens.utilities.statistics import sign_flip_permutation_pvalue

from lensattr.claims import claimed_sets, compute_claims, type_scores
from lensattr.claims.head_types import allowed_keys
from lensattr.core.prompts import PromptSet
from lensattr.stats.inference import bh_qvalues, ratio_of_means, signflip_p


def one_head(rows):
    """A [1, 1, 1, q, k] pattern from a list of rows."""
    return torch.tensor(rows, dtype=torch.float)[None, None, None]


def test_type_scores_by_hand():
    # tokens: a b a b  -> query 2 (a) has an earlier a at 0, token after it is 1;
    #                     query 3 (b) has an earlier b at 1, token after it is 2.
    prompts = PromptSet(tokens=torch.tensor([[5, 6, 5, 6]]), roles={"BOS": 0})
    P = one_head([[1, 0, 0, 0], [0.2, 0.8, 0, 0], [0.1, 0.6, 0.3, 0], [0.1, 0.2, 0.3, 0.4]])
    s = type_scores(P, prompts)
    assert s["previous_token"].item() == pytest.approx((0.2 + 0.6 + 0.3) / 3)
    assert s["self"].item() == pytest.approx((0.8 + 0.3 + 0.4) / 3)
    assert s["sink"].item() == pytest.approx((0.2 + 0.1 + 0.1) / 3)
    assert s["duplicate_token"].item() == pytest.approx((0.1 + 0.2) / 2)
    assert s["induction"].item() == pytest.approx((0.6 + 0.3) / 2)


def test_type_scores_skip_padding_and_undefined():
    prompts = PromptSet(
        tokens=torch.tensor([[5, 6, 7, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0]])
    )
    P = one_head([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    s = type_scores(P, prompts)
    assert s["previous_token"].item() == pytest.approx(1.0)  # query 3 is padding
    assert math.isnan(s["induction"].item())  # no repeated token: undefined, not 0


def test_claimed_sets_by_hand():
    P = one_head(
        [
            [1.0, 0, 0, 0],  # only the sink: claims nothing (the row is not edited)
            [0.6, 0.35, 0.05, 0],  # [BOS 0.60, S1 0.35]: claims S1, not BOS
            [0.1, 0.3, 0.6, 0],  # 0.6 alone covers 50% of the non-sink 0.9
            [0.2, 0.3, 0.25, 0.25],  # non-sink 0.8: 0.3 then one 0.25 -> 2 sources
        ]
    )
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()[None]
    C = claimed_sets(P, torch.tensor([[True, False, False, False]]), allowed)[0, 0, 0]
    assert C[0].tolist() == [False, False, False, False]
    assert C[1].tolist() == [False, True, False, False]
    assert C[2].tolist() == [False, False, True, False]
    assert C[3].sum() == 2 and C[3, 1] and not C[3, 0]


def test_compute_claims_entropy_and_top():
    prompts = PromptSet(tokens=torch.tensor([[5, 6, 7]]))
    uniform = torch.tensor([[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]])
    c = compute_claims([uniform[None, None]], prompts, torch.tensor([2]))
    assert c.entropy_read[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert bool(c.diffuse[0, 0])
    assert allowed_keys(prompts, causal=False).all()


def test_ratio_of_means_and_ci():
    num = torch.tensor([1.0, 2.0, 3.0, 4.0])
    den = torch.tensor([2.0, 2.0, 2.0, 2.0])
    e = ratio_of_means(num, den, n_boot=500)
    assert e.value == pytest.approx(2.5 / 2)
    assert e.lo <= e.value <= e.hi and e.lo < e.hi
    assert e.per_prompt.tolist() == pytest.approx([0.5, 1.0, 1.5, 2.0])
    const = ratio_of_means(torch.full((5,), 3.0), torch.full((5,), 6.0))
    assert (const.value, const.lo, const.hi) == pytest.approx((0.5, 0.5, 0.5))
    assert math.isnan(ratio_of_means(num, torch.zeros(4)).value)


def test_signflip_matches_transformer_lens():
    x = torch.tensor([[0.5, 1.0, -0.2, 0.8, 0.3, 0.9], [0.1, -0.1, 0.2, -0.2, 0.05, -0.05]])
    ref = sign_flip_permutation_pvalue(x.double())  # exact for n <= 12
    torch.testing.assert_close(signflip_p(x), ref.float())


def test_bh_by_hand():
    p = torch.tensor([0.01, 0.04, 0.03, 0.5, float("nan")])
    q = bh_qvalues(p)
    # sorted 0.01, 0.03, 0.04, 0.5 (m=4): 0.04, 0.06, 0.0533, 0.5 -> monotone 0.04, .0533, .0533
    assert q[:4].tolist() == pytest.approx([0.04, 4 * 0.04 / 3, 4 * 0.04 / 3, 0.5])
    assert math.isnan(q[4].item())


def test_type_scores_match_transformer_lens_head_detector(random_gpt2):
    """TL's "mul" score divides by every query row; ours averages over the rows where the
    score is defined, so TL = ours * (#defined rows / #rows)."""
    from transformer_lens.head_detector import detect_head

    words = ["w3", "w9", "w4", "w17", "w30"]
    seq = " ".join(words + words)  # repeated: duplicate and induction rows exist
    toks = random_gpt2.to_tokens(seq)  # BOS + 10 tokens
    _, cache = random_gpt2.run_with_cache(toks)
    P = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(2)], 1)
    ours = type_scores(P, PromptSet(tokens=toks))
    T = toks.shape[1]
    defined = {"previous_token": T - 1, "duplicate_token": 5, "induction": 5}
    names = {"previous_token": "previous_token_head", "duplicate_token": "duplicate_token_head",
             "induction": "induction_head"}
    for ours_name, tl_name in names.items():
        tl = detect_head(random_gpt2, seq, tl_name)
        torch.testing.assert_close(ours[ours_name] * defined[ours_name] / T, tl.float(),
                                   atol=1e-5, rtol=0)


def test_claimed_sets_in_prompt_chunks_equal_all_at_once(monkeypatch):
    """claimed_sets works prompt by prompt; computed a few prompts at a time (bounded
    temporaries) it gives the same sets as in one go, padding and sinks included."""
    import importlib

    cs = importlib.import_module("lensattr.claims.claimed_sets")  # the module, not the function

    g = torch.Generator().manual_seed(0)
    b, L, H, p = 7, 2, 3, 6
    P = torch.rand(b, L, H, p, p, generator=g) ** 4
    allowed = torch.ones(p, p).tril().bool().expand(b, p, p).clone()
    allowed[2, :, 4:] = False  # a prompt with padding
    P = P * allowed[:, None, None]
    P = P / P.sum(-1, keepdim=True).clamp(min=1e-9)
    sink = torch.zeros(b, p, dtype=torch.bool)
    sink[:, 0] = True
    whole = claimed_sets(P, sink, allowed)
    monkeypatch.setattr(cs, "_CHUNK", 2 * P[0].numel())  # two prompts a step
    chunked = cs.claimed_sets(P, sink, allowed)
    assert torch.equal(whole, chunked) and whole.any() and not whole[..., 0].any()
