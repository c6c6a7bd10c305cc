"""Rank agreement: equals scipy's rho and tau-b (ties included); 1 for identical inputs, ~0
for independent ones; per layer rows; CIs cover the point."""

import pytest
import torch

from lensattr.stats.agreement import kendall, rank_agreement, spearman

stats = pytest.importorskip("scipy.stats")


def test_spearman_kendall_equal_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randint(0, 5, (12,), generator=g).double()  # many ties
        y = x + torch.randint(0, 4, (12,), generator=g).double()
        assert abs(spearman(x, y).item() - stats.spearmanr(x, y).statistic) < 1e-12
        assert abs(kendall(x, y).item() - stats.kendalltau(x, y).statistic) < 1e-12


def test_identical_is_one_independent_is_near_zero():
    g = torch.Generator().manual_seed(1)
    claim = torch.rand(20, 3, 8, generator=g)  # [batch, layer, head]
    same = rank_agreement(claim, claim.clone(), layer_dim=1, n_boot=200)
    assert len(same) == 4 and same["layer"].isna().sum() == 1
    assert (same["rho"] == 1).all() and (same["tau"] == 1).all()
    assert (same["rho_lo"] > 0.99).all()
    other = torch.rand(20, 3, 8, generator=g)
    ind = rank_agreement(claim, other, n_boot=200)
    assert abs(ind["rho"].item()) < 0.35 and abs(ind["tau"].item()) < 0.25
    assert ind["rho_lo"].item() < ind["rho"].item() < ind["rho_hi"].item()
    assert ind["rho_lo"].item() < 0 < ind["rho_hi"].item()
    # per-prompt pairing (token importances): identical -> 1; reversed -> -1
    tok = torch.rand(10, 7, generator=g)
    pp = rank_agreement(tok, tok, how="per_prompt", n_boot=100)
    assert pp["rho"].item() == pytest.approx(1.0) and pp["tau_lo"].item() == pytest.approx(1.0)
    assert rank_agreement(tok, -tok, how="per_prompt", n_boot=50)["tau"].item() == -1


def test_nan_items_left_out_and_bad_input():
    x = torch.rand(6, 5)
    x[:, 0] = torch.nan
    r = rank_agreement(x, x, n_boot=20)
    assert r["n_items"].item() == 4 and r["rho"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        rank_agreement(torch.rand(3, 4), torch.rand(3, 5))
    with pytest.raises(ValueError, match="how"):
        rank_agreement(x, x, how="pooled")


def test_noise_floor_zeroes_rounding_and_keeps_real_effects():
    import math

    from lensattr.stats.agreement import EFFECT_NOISE, floor_effects, noise_floor

    m0 = torch.tensor([3.0, -9.0, 1.0])
    den = torch.tensor([-2.0, -2.0, -2.0])
    f = noise_floor(m0, den)
    assert f == pytest.approx(EFFECT_NOISE * 10.0 / 2.0)
    assert noise_floor(m0, torch.zeros(3)) == math.inf  # no reference movement: nothing ranks
    x = torch.tensor([1e-7, -3e-5, 2e-4, float("nan"), -1e-3])
    y = floor_effects(x, f)
    assert y[0] == 0 and y[1] == 0 and y[2] == x[2] and y[4] == x[4] and y[3].isnan()
    # rounding noise around 0 is no ranking: after the floor a claim meets a constant side
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20, generator=g) * 1e-7
    claim = torch.arange(20.0)
    assert not torch.isnan(spearman(claim, noise.abs()))
    assert torch.isnan(spearman(claim, floor_effects(noise.abs(), f)))


def test_bootstrap_means_without_the_replicate_tensor():
    """The bootstrap means of the "mean" agreement are ``x[idx].nanmean(1)`` (NaN where a
    replicate drew no finite value of an item), computed from draw counts, so no
    [n_boot, prompts, items] tensor is made."""
    from lensattr.stats.agreement import _boot_means

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, generator=g, dtype=torch.float64)
    x[3, 2] = float("nan")
    x[:, 5] = float("nan")
    x[::2, 6] = float("nan")
    idx = torch.randint(0, 40, (300, 40), generator=g)
    ref, got = x[idx].nanmean(1), _boot_means(x, idx)
    assert torch.equal(ref.isnan(), got.isnan()) and got[:, 5].isnan().all()
    torch.testing.assert_close(got.nan_to_num(), ref.nan_to_num(), atol=1e-12, rtol=0)
    x[7, 1] = float("inf")  # an infinite value counts only where it is drawn
    assert torch.equal(_boot_means(x, idx).isinf(), x[idx].nanmean(1).isinf())
