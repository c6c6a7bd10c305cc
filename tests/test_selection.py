"""Intervals after selection (lensattr.compare.selection): the Benjamini-Yekutieli level, FCR
Fieller estimates, and a simulation in which marginal intervals on BH-selected cells under-cover
and the FCR intervals do not. Fixed seeds throughout."""

import math

import pytest
import torch

from lensattr.stats.inference import bh_qvalues, ratio_of_means, signflip_p
from lensattr.stats.selection import fcr_estimates, fcr_level

ALPHA = 0.05


# ---- fcr_level --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "r", "m", "want"),
    [
        (0.05, 10, 144, 1 - 0.05 * 10 / 144),  # 0.996527...
        (0.05, 1, 270, 1 - 0.05 / 270),  # 0.999814...
        (0.05, 27, 270, 0.995),
        (0.10, 5, 20, 0.975),
        (0.05, 144, 144, 0.95),  # everything selected: no selection, the marginal level
        (0.05, 0, 144, 0.95),  # nothing selected: the marginal level
        (0.05, 0, 0, 0.95),  # nothing tested
    ],
)
def test_fcr_level_hand_values(alpha, r, m, want):
    assert fcr_level(alpha, r, m) == pytest.approx(want, abs=1e-15)


def test_fcr_level_monotone_and_bounded():
    levels = [fcr_level(0.05, r, 200) for r in range(1, 201)]
    assert all(a > b for a, b in zip(levels, levels[1:], strict=False))  # more selected: lower
    assert levels[0] < 1 and levels[-1] == pytest.approx(0.95)


@pytest.mark.parametrize(("alpha", "r", "m"), [(0.0, 1, 2), (1.0, 1, 2), (0.05, 3, 2),
                                               (0.05, -1, 2), (0.05, 1, -1), (0.05, 1.5, 3)])
def test_fcr_level_rejects_bad_input(alpha, r, m):
    with pytest.raises(ValueError):
        fcr_level(alpha, r, m)


# ---- fcr_estimates ----------------------------------------------------------------------------


def _cells(n_cells=6, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    den = -(1 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64))
    theta = torch.linspace(0.0, 1.0, n_cells, dtype=torch.float64)[:, None]
    num = theta * den + 0.1 * torch.randn(n_cells, n, generator=g, dtype=torch.float64)
    return num, den


def _same(a, b):
    for x, y in ((a.value, b.value), (a.lo, b.lo), (a.hi, b.hi)):
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12, abs=1e-12)
    assert a.n == b.n


def test_selected_cells_get_the_fieller_interval_at_the_fcr_level():
    num, den = _cells()
    sel = torch.tensor([True, False, True, False, False, True])
    out = fcr_estimates(num, den, sel, ALPHA)
    level = fcr_level(ALPHA, 3, 6)
    for i in range(6):
        want = ratio_of_means(num[i], den, level=level if sel[i] else 0.95)
        _same(out[i], want)
        torch.testing.assert_close(out[i].per_prompt, want.per_prompt, equal_nan=True)
        marginal = ratio_of_means(num[i], den)
        assert out[i].lo <= marginal.lo and out[i].hi >= marginal.hi  # nested
        if sel[i]:
            assert out[i].hi - out[i].lo > marginal.hi - marginal.lo  # strictly wider


def test_n_tested_sets_m_for_a_subset_of_cells():
    num, den = _cells()
    out = fcr_estimates(num[:2], den, [True, True], ALPHA, n_tested=144)
    for i in range(2):
        _same(out[i], ratio_of_means(num[i], den, level=1 - ALPHA * 2 / 144))


def test_per_cell_denominators_and_lists():
    num, den = _cells()
    dens = den.expand_as(num) * torch.linspace(1, 2, 6, dtype=torch.float64)[:, None]
    sel = [False, True, False, True, False, False]
    a = fcr_estimates(num, dens, sel, ALPHA)
    b = fcr_estimates(list(num), list(dens), sel, ALPHA)
    for i in range(6):
        _same(a[i], b[i])
        _same(a[i], ratio_of_means(num[i], dens[i], level=fcr_level(ALPHA, 2, 6) if sel[i]
                                   else 0.95))


def test_nothing_selected_is_marginal_and_no_cells_is_empty():
    num, den = _cells()
    out = fcr_estimates(num, den, torch.zeros(6, dtype=torch.bool), ALPHA)
    for i in range(6):
        _same(out[i], ratio_of_means(num[i], den))
    assert fcr_estimates(torch.empty(0, 16, dtype=torch.float64), den, [], ALPHA) == []


def test_nan_prompts_and_undefined_cells():
    num, den = _cells()
    num[0, :3] = float("nan")  # dropped pairwise
    num[1] = float("nan")  # no complete prompt
    num[2, 1:] = float("nan")  # one prompt: a value, no interval
    sel = torch.ones(6, dtype=torch.bool)
    out = fcr_estimates(num, den, sel, ALPHA)
    level = fcr_level(ALPHA, 6, 6)
    _same(out[0], ratio_of_means(num[0], den, level=level))
    assert out[0].n == 13
    assert math.isnan(out[1].value) and math.isnan(out[1].lo) and out[1].n == 0
    assert math.isfinite(out[2].value) and math.isnan(out[2].lo) and math.isnan(out[2].hi)


def test_unbounded_at_the_higher_level():
    # a denominator significant at 95% but not at 99.98%: the FCR interval is unbounded
    g = torch.Generator().manual_seed(3)
    den = 0.5 + 0.8 * torch.randn(16, generator=g, dtype=torch.float64)
    den = den - den.mean() + 0.5
    num = 0.5 * den + 0.05 * torch.randn(16, generator=g, dtype=torch.float64)
    marginal = ratio_of_means(num, den)
    assert math.isfinite(marginal.lo) and math.isfinite(marginal.hi)
    (out,) = fcr_estimates(num[None], den, [True], ALPHA, n_tested=270)
    assert out.lo == -math.inf and out.hi == math.inf


def test_bad_shapes():
    num, den = _cells()
    with pytest.raises(ValueError):
        fcr_estimates(num, den, [True, False], ALPHA)
    with pytest.raises(ValueError):
        fcr_estimates(num[0], den, [True], ALPHA)


# ---- selection makes marginal intervals under-cover; FCR intervals do not ---------------------


def test_fcr_holds_where_marginal_intervals_under_cover_after_bh_selection():
    """100 independent cells, 12 prompts: 5 strong effects and 95 weak ones (mean 0.4 sd of a
    prompt, z ~ 1.4), selected by BH over the exact sign-flip p-values of the denominator (the
    head's effect). The ratio's numerator carries the denominator's prompt-level noise
    (num = 0.5 den + u + 0.2 eta: prompts where the effect is larger route more), so the weak
    cells BH happens to select have ratios biased upward and their marginal 95% intervals miss.
    Measured (seed 0, 150 runs): marginal FCR 0.25, BY FCR 0.03."""
    reps, m, n, rho = 150, 100, 12, 0.5
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([2.0] * 5 + [0.4] * 95, dtype=torch.float64)
    u = torch.randn(reps, m, n, generator=g, dtype=torch.float64)
    eta = torch.randn(reps, m, n, generator=g, dtype=torch.float64)
    den = mu[:, None] + u
    num = rho * den + u + 0.2 * eta  # E(num) / E(den) = rho exactly
    p = signflip_p(den.reshape(-1, n)).reshape(reps, m)  # exact enumeration (n <= 16)
    fcr_marg, fcr_by, selected = [], [], 0
    for r in range(reps):
        sel = bh_qvalues(p[r]) < ALPHA
        k = int(sel.sum())
        selected += k
        idx = sel.nonzero().flatten().tolist()
        marg = fcr_estimates(num[r, idx], den[r, idx], torch.zeros(k, dtype=torch.bool), ALPHA)
        by = fcr_estimates(num[r, idx], den[r, idx], torch.ones(k, dtype=torch.bool), ALPHA,
                           n_tested=m)
        fcr_marg.append(sum(not e.lo <= rho <= e.hi for e in marg) / max(k, 1))
        fcr_by.append(sum(not e.lo <= rho <= e.hi for e in by) / max(k, 1))
    assert selected / reps > 5  # weak cells do get selected
    fm, fb = torch.tensor(fcr_marg), torch.tensor(fcr_by)
    se_m, se_b = fm.std() / reps**0.5, fb.std() / reps**0.5
    assert fm.mean() > ALPHA + 3 * se_m, (fm.mean(), se_m)  # marginal intervals under-cover
    assert fb.mean() <= ALPHA + 3 * se_b, (fb.mean(), se_b)  # BY keeps the FCR at alpha
    assert fb.mean() <= ALPHA  # and in fact below it here
