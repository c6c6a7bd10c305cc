"""Statistics layer (issue 12, items 1-3): Fieller interval coverage, per-prompt values, sign-flip
floors, TOST and one-sided tests. Simulations are vectorised over runs with a fixed seed."""

import math

import pytest
import torch
from transformer_lens.utilities.statistics import sign_flip_permutation_pvalue

from lensattr.stats.inference import (
    bh_qvalues,
    min_prompts,
    one_sided_p,
    p_floor,
    ratio_of_means,
    ratio_p,
    signflip_p,
    tost_p,
)
from lensattr.stats.ratio import fieller, t_cdf, t_ppf

DELTA = 0.03


# ---- Student's t ------------------------------------------------------------------------------


def test_t_distribution_closed_forms():
    t = torch.linspace(-40, 40, 161, dtype=torch.float64)
    torch.testing.assert_close(t_cdf(t, 1), 0.5 + torch.atan(t) / math.pi, atol=1e-14, rtol=0)
    torch.testing.assert_close(
        t_cdf(t, 2), 0.5 + t / (2 * torch.sqrt(2 + t * t)), atol=1e-14, rtol=0
    )
    # published 97.5% quantiles (df 1, 2, 7, 15, 31)
    want = [12.706204736, 4.302652730, 2.364624252, 2.131449546, 2.039513446]
    got = t_ppf(0.975, torch.tensor([1, 2, 7, 15, 31]))
    assert got.tolist() == pytest.approx(want, abs=1e-8)
    assert t_cdf(torch.tensor([math.inf, -math.inf]), 5).tolist() == [1.0, 0.0]
    assert math.isnan(t_ppf(0.975, torch.tensor([0])).item())


def test_t_distribution_matches_scipy():
    st = pytest.importorskip("scipy.stats")
    t = torch.cat([torch.linspace(-12, 12, 97, dtype=torch.float64), torch.tensor([1e-9])])
    for df in (3, 4, 9, 30, 101, 400):
        ref = torch.from_numpy(st.t.cdf(t.numpy(), df))
        torch.testing.assert_close(t_cdf(t, df), ref, atol=1e-13, rtol=0)


# ---- Fieller interval: contracts --------------------------------------------------------------


def test_ratio_degenerate_cases():
    nan = math.nan
    one = ratio_of_means(torch.tensor([1.0]), torch.tensor([2.0]))
    assert one.value == 0.5 and math.isnan(one.lo) and math.isnan(one.hi) and one.n == 1
    const = ratio_of_means(torch.full((6,), 0.3), torch.full((6,), -2.0))
    assert const.value == pytest.approx(-0.15) and const.lo == const.hi == const.value
    # denominator not significantly non-zero: the ratio is not bounded
    wild = ratio_of_means(torch.tensor([1.0, 2.0, 3.0, 2.0]), torch.tensor([2.0, -1.0, 3.0, -2.5]))
    assert wild.lo == -math.inf and wild.hi == math.inf and math.isfinite(wild.value)
    zero = ratio_of_means(torch.tensor([1.0, 2.0]), torch.zeros(2))
    assert math.isnan(zero.value) and math.isnan(zero.lo) and zero.per_prompt.isnan().all()
    # NaN prompts are dropped pairwise: same as leaving them out
    num = torch.tensor([0.5, nan, 0.7, 0.4, 0.6, 0.1])
    den = torch.tensor([1.0, 1.0, 1.2, nan, 0.9, 1.1])
    e, ref = ratio_of_means(num, den), ratio_of_means(num[[0, 2, 4, 5]], den[[0, 2, 4, 5]])
    assert (e.value, e.lo, e.hi, e.n) == pytest.approx((ref.value, ref.lo, ref.hi, 4))
    assert e.per_prompt[[1, 3]].isnan().all()
    # [cells, batch] with a shared denominator = one call per cell
    g = torch.Generator().manual_seed(0)
    nums, d = torch.randn(3, 10, generator=g) + 1, torch.randn(10, generator=g) * 0.2 + 2
    for a, b in zip(ratio_of_means(nums, d), [ratio_of_means(x, d) for x in nums], strict=True):
        assert (a.value, a.lo, a.hi) == (b.value, b.lo, b.hi)


def test_fieller_inverts_the_t_test():
    """At its bounds, the one-sided t test of the ratio sits exactly at 2.5%; TOST <= 5% exactly
    when the 90% interval is inside the margin."""
    g = torch.Generator().manual_seed(1)
    den = -1 + 0.3 * torch.randn(200, 12, generator=g, dtype=torch.float64)
    num = 0.02 * den + 0.02 * torch.randn(200, 12, generator=g, dtype=torch.float64)
    _, lo, hi, _ = fieller(num, den)
    for i in range(0, 200, 40):
        assert ratio_p(num[i], den[i], lo[i].item(), alternative="greater").item() == (
            pytest.approx(0.025, abs=1e-9)
        )
        assert ratio_p(num[i], den[i], hi[i].item(), alternative="less").item() == (
            pytest.approx(0.025, abs=1e-9)
        )
    _, lo90, hi90, _ = fieller(num, den, level=0.90)
    inside = (lo90 >= -DELTA) & (hi90 <= DELTA)
    p = tost_p(num, den, DELTA)
    assert 0 < inside.sum() < 200
    assert torch.equal(p <= 0.05, inside)


# ---- item 3: one quantity per label -----------------------------------------------------------


def test_per_prompt_values_explain_the_estimate():
    num = torch.tensor([0.2, 0.5, math.nan, 0.1, 0.3])
    den = torch.tensor([0.1, 1.0, 1.0, 2.0, 0.9])  # noisy: one prompt's own ratio is 2.0
    e = ratio_of_means(num, den)
    mean_den = (0.1 + 1.0 + 2.0 + 0.9) / 4
    assert e.per_prompt[[0, 1, 3, 4]].tolist() == pytest.approx(
        [0.2 / mean_den, 0.5 / mean_den, 0.1 / mean_den, 0.3 / mean_den]
    )
    assert e.per_prompt.nanmean().item() == pytest.approx(e.value, rel=1e-12)
    cells = ratio_of_means(torch.randn(4, 9), torch.rand(9) + 0.5)
    assert all(c.per_prompt.mean().item() == pytest.approx(c.value, rel=1e-12) for c in cells)


# ---- item 1: coverage simulation --------------------------------------------------------------


def simulate(theta, n, sims, gen):
    """Noisy prompts: den = -1 + 0.3 z_b; num = theta * den + 0.02 (0.5 z_b + 0.87 z_e)."""
    zb = torch.randn(sims, n, generator=gen, dtype=torch.float64)
    ze = torch.randn(sims, n, generator=gen, dtype=torch.float64)
    den = -1 + 0.3 * zb
    return theta * den + 0.02 * (0.5 * zb + 0.75**0.5 * ze), den


def percentile_bootstrap(num, den, gen, n_boot=400):
    """The former lensattr interval: percentile bootstrap of the ratio, prompts resampled
    jointly (vectorised over runs)."""
    sims, n = num.shape
    idx = torch.randint(0, n, (sims, n_boot, n), generator=gen)
    a = num[:, None].expand(-1, n_boot, -1).gather(-1, idx).mean(-1)
    b = den[:, None].expand(-1, n_boot, -1).gather(-1, idx).mean(-1)
    q = torch.quantile(a / b, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=-1)
    return q[0], q[1]


def coverage_and_false_null(interval, n, sims, seed=0):
    """Coverage pooled over true effects (0, delta, 0.1, 0.5) and, at a true effect of exactly
    delta, the share of runs whose CI lies inside [-delta, delta], and the runs themselves.
    ``sims`` runs at delta, a quarter as many at each other effect."""
    gen = torch.Generator().manual_seed(seed)
    covered, runs, false_null, margin = 0, 0, 0.0, None
    for theta in (0.0, DELTA, 0.1, 0.5):
        k = sims if theta == DELTA else sims // 4
        num, den = simulate(theta, n, k, gen)
        lo, hi = interval(num, den, gen)
        covered += int(((lo <= theta) & (theta <= hi)).sum())
        runs += k
        if theta == DELTA:
            false_null = float(((lo >= -DELTA) & (hi <= DELTA)).double().mean())
            margin = (num, den)
    return covered / runs, false_null, margin


def fieller_interval(num, den, gen):
    return fieller(num, den)[1:3]


def passes(cov, false_null, sims, nominal_null=0.025):
    """Coverage >= 0.94, false null not above nominal beyond simulation error (3 SE)."""
    se = math.sqrt(nominal_null * (1 - nominal_null) / sims)
    return cov >= 0.94 and false_null <= nominal_null + 3 * se


@pytest.mark.parametrize("n", [8, 16, 32])
def test_fieller_coverage_on_noisy_effects(n):
    sims = 16000
    cov, false_null, (num, den) = coverage_and_false_null(fieller_interval, n, sims)
    assert passes(cov, false_null, sims), (n, cov, false_null)
    # TOST at 5% (the 90% interval inside the margin) at a true effect of exactly delta
    rate = float((tost_p(num, den, DELTA) < 0.05).double().mean())
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / sims), (n, rate)


def test_percentile_bootstrap_fails_the_coverage_test():
    """The same check rejects the former interval (coverage ~0.89, false null ~6% at n = 8)."""
    sims = 2000
    cov, false_null, _ = coverage_and_false_null(percentile_bootstrap, 8, sims)
    assert not passes(cov, false_null, sims)
    assert cov < 0.91 and false_null > 0.04


# ---- item 2: floors, exact sign-flip, one-sided tests -----------------------------------------


def test_signflip_exact_floor_and_nan():
    x = torch.tensor([[0.3, 0.5, 0.2, 0.9, 0.4], [0.3, 0.5, -0.2, 0.9, 0.4]])
    p = signflip_p(x, seed=1)
    assert p[0].item() == pytest.approx(2 / 32) == pytest.approx(p_floor(5))
    assert torch.equal(p, signflip_p(x, seed=7))  # exact: no seed dependence
    assert signflip_p(x, alternative="greater")[0].item() == pytest.approx(1 / 32)
    assert signflip_p(torch.zeros(1, 6)).item() == 1.0
    # NaN prompts are dropped, not counted as zero effects
    with_nan = torch.tensor([[0.3, math.nan, 0.5, 0.2, 0.9, 0.4]])
    assert signflip_p(with_nan).item() == pytest.approx(2 / 32)
    assert math.isnan(signflip_p(torch.full((1, 3), math.nan)).item())
    # exact up to 16 prompts, and TransformerLens's exact enumeration agrees up to 12
    g = torch.Generator().manual_seed(2)
    y = torch.randn(20, 12, generator=g, dtype=torch.float64) + 0.4
    torch.testing.assert_close(signflip_p(y), sign_flip_permutation_pvalue(y).float())


def test_min_prompts_is_the_bh_floor():
    """At n = min_prompts(m) a lone head with every prompt in one direction passes BH over m
    heads; at n - 1 it cannot, whatever its data."""
    assert [min_prompts(m) for m in (1, 12, 144, 1024)] == [6, 9, 13, 16]
    assert min_prompts(12, test="signflip_one_sided") == 8 and min_prompts(500, test="t") == 2
    for m in (12, 144):
        n = min_prompts(m)
        for k, ok in ((n, True), (n - 1, False)):
            x = torch.ones(m, k)
            x[1:, 1::2] = -1  # the other heads: mean 0 or one prompt off, p large
            q = bh_qvalues(signflip_p(x))
            assert bool(q[0] < 0.05) is ok, (m, k, q[0].item())


def test_signflip_resolution_does_not_block_bh():
    """Beyond exact enumeration, the Monte Carlo p-value of a clear head is fine enough for BH
    over 144 heads (the former 2000 draws floored p at 1/2001: q >= 0.072)."""
    m, n = 144, 24
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, n, generator=g)
    x[0] = x[0].abs() + 1.0
    p = signflip_p(x)
    assert bh_qvalues(p)[0].item() < 0.05
    assert 1 / 2001 * m > 0.05


def test_one_sided_and_ratio_tests():
    x = torch.tensor([[0.21, 0.25, 0.3, 0.22, 0.28, 0.26]])
    assert one_sided_p(x, 0.2).item() == pytest.approx(1 / 64)
    assert one_sided_p(x, 0.2, alternative="less").item() == 1.0
    assert one_sided_p(x, 0.2, method="t").item() < 0.01
    assert one_sided_p(torch.full((1, 4), 0.5), 0.2, method="t").item() == 0.0  # zero variance
    assert math.isnan(one_sided_p(torch.tensor([[0.5]]), 0.2, method="t").item())
    # level of the one-sided ratio test at a true ratio exactly on the threshold
    gen = torch.Generator().manual_seed(4)
    sims = 20000
    num, den = simulate(0.1, 10, sims, gen)
    rate = float((ratio_p(num, den, 0.1, alternative="greater") < 0.05).double().mean())
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / sims)
    assert float((ratio_p(num, den, 0.05) < 0.05).double().mean()) > 0.5  # and it has power


def test_signflip_monte_carlo_does_not_depend_on_chunking():
    """The Monte Carlo sign patterns are drawn in chunks bounded by rows and prompts (memory);
    a row's p-value is the same whether it is tested alone or with 2000 others (other chunk
    sizes)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2001, 300, generator=g, dtype=torch.float64) * 0.05 + 0.01
    alone = signflip_p(x[:1], seed=5, n_perm=5000)
    together = signflip_p(x, seed=5, n_perm=5000)
    assert torch.equal(alone, together[:1])
