"""Paired ratio of means: Fieller's interval and t tests of the ratio against a threshold.

Data: per prompt i a numerator ``a_i`` and a denominator ``b_i`` (paired; NaN/inf prompts are
dropped pairwise). The estimate is ``theta = mean(a) / mean(b)``. Everything here rests on one
pivot: for a candidate ratio ``c``, ``d_i(c) = a_i - c * b_i`` has mean 0 exactly when
``theta = c``, and its one-sample t statistic ``T(c) = mean(d) / (sd(d) / sqrt(n))`` follows
Student's t with ``n - 1`` df when the pairs are bivariate normal (no delta-method
linearisation, whatever the noise in the denominator).

* :func:`fieller` inverts the two-sided test: the set of ``c`` with ``|T(c)| <= t_{1-a/2}``.
* :func:`ratio_p` is the one-sided test of ``theta > c`` (or ``< c``).
* :func:`tost_p` is the equivalence test of ``|theta| < delta`` (two one-sided tests); it is
  ``<= alpha`` exactly when the ``1 - 2 alpha`` Fieller interval is bounded and inside
  ``[-delta, delta]``.

Everything is vectorised over leading dimensions (``[..., batch]``), in float64, and needs no
SciPy: Student's t CDF for integer df is a finite series (Abramowitz & Stegun 26.7.3-4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

__all__ = ["PairedMoments", "moments", "t_cdf", "t_sf", "t_ppf", "fieller", "ratio_p", "tost_p"]


# ---- Student's t for integer degrees of freedom -----------------------------------------------


def t_cdf(t: Tensor, df: Tensor | int) -> Tensor:
    """P(T <= t) for Student's t with integer ``df >= 1`` (broadcast), exact finite series.

    Accurate to ~1e-15 absolute (so a p-value of 1e-6 is right to ~1e-9 relative; tails below
    ~1e-15 come out as ~0); ``t = +-inf`` gives 1 / 0; ``df < 1`` or NaN gives NaN.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    df = torch.as_tensor(df, dtype=torch.float64, device=t.device)
    t, df = cast("tuple[Tensor, Tensor]", torch.broadcast_tensors(t, df))  # torch types it Any
    bad = ~(df >= 1) | torch.isnan(t)
    nu = torch.where(bad, torch.ones_like(df), df)
    tt = torch.where(bad, torch.zeros_like(t), t)
    c = nu / (nu + tt * tt)  # cos^2(theta), theta = atan(t / sqrt(nu))
    s = torch.where(  # sin(theta) = t / sqrt(nu + t^2), +-1 at +-inf
        torch.isinf(tt), torch.sign(tt), tt / torch.sqrt(nu + tt * tt).clamp(min=1e-300)
    )
    even = torch.remainder(nu, 2) == 0
    n_terms = torch.where(even, nu / 2, (nu - 1) / 2)  # even: k < nu/2; odd: k < (nu-1)/2
    # term k: c^k * (even) G(k+1/2)/(G(1/2)G(k+1)) = (2k-1)!!/(2k)!!,
    #               (odd)  G(k+1)G(3/2)/G(k+3/2) = (2k)!!/(2k+1)!!
    log_c = torch.log(c)[..., None]
    ev, nt = even[..., None], n_terms[..., None]
    total = torch.zeros_like(c)
    k_max = int(n_terms.max().item()) if n_terms.numel() else 0
    step = max(1, (1 << 22) // max(1, c.numel()))
    for k0 in range(0, k_max, step):
        k = torch.arange(k0, min(k_max, k0 + step), dtype=torch.float64, device=c.device)
        log_coef = torch.where(
            ev,
            torch.lgamma(k + 0.5) - math.lgamma(0.5) - torch.lgamma(k + 1),
            torch.lgamma(k + 1) + math.lgamma(1.5) - torch.lgamma(k + 1.5),
        )
        kc = torch.where(k == 0, 0.0, k * log_c)  # c^0 = 1 even where c == 0 (t = +-inf)
        terms = torch.where(k < nt, torch.exp(kc + log_coef), 0.0)
        total = total + terms.sum(-1)
    cdf_even = 0.5 + 0.5 * s * total
    theta = torch.atan2(s, torch.sqrt(c))
    cdf_odd = 0.5 + (theta + s * torch.sqrt(c) * total) / math.pi
    out = torch.where(even, cdf_even, cdf_odd).clamp(0.0, 1.0)
    return torch.where(bad, torch.full_like(out, float("nan")), out)


def t_sf(t: Tensor, df: Tensor | int) -> Tensor:
    """P(T > t) = t_cdf(-t, df) (symmetric)."""
    return t_cdf(-torch.as_tensor(t, dtype=torch.float64), df)


_PPF: dict[tuple[float, float], float] = {}  # (q, df) -> quantile, computed once each


def t_ppf(q: float, df: Tensor | int) -> Tensor:
    """The ``q`` quantile of Student's t with integer ``df`` (tensor), by bisection (once per
    distinct (q, df), then remembered); NaN where ``df < 1``."""
    df = torch.as_tensor(df, dtype=torch.float64)
    flat = df.reshape(-1)
    out = torch.full_like(flat, float("nan"))
    for d in torch.unique(flat[flat >= 1]).tolist():
        key = (float(q), float(d))
        if key not in _PPF:
            _PPF[key] = float(_t_ppf_bisect(q, torch.tensor([d], dtype=torch.float64))[0])
        out[flat == d] = _PPF[key]
    return out.reshape(df.shape)


def _t_ppf_bisect(q: float, df: Tensor) -> Tensor:
    lo = torch.full_like(df, -1e6)
    hi = torch.full_like(df, 1e6)
    for _ in range(90):
        mid = (lo + hi) / 2
        below = t_cdf(mid, df) < q
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    out = (lo + hi) / 2
    return torch.where(df >= 1, out, torch.full_like(out, float("nan")))


# ---- paired moments ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedMoments:
    """Pairwise-complete moments of (a, b) along the last axis. ``v*`` are variances of the
    means (sample (co)variance / n); ``n`` is the number of complete pairs."""

    n: Tensor
    a: Tensor
    b: Tensor
    vaa: Tensor
    vbb: Tensor
    vab: Tensor

    def var_of_diff(self, c: Tensor | float) -> Tensor:
        """Variance of mean(a - c b)."""
        return (self.vaa - 2 * c * self.vab + c * c * self.vbb).clamp(min=0)


def moments(num: Tensor, den: Tensor) -> PairedMoments:
    num, den = torch.broadcast_tensors(num.double(), den.double())
    ok = torch.isfinite(num) & torch.isfinite(den)
    n = ok.sum(-1).double()
    a0, b0 = torch.where(ok, num, 0.0), torch.where(ok, den, 0.0)
    a, b = a0.sum(-1) / n, b0.sum(-1) / n  # NaN when n == 0
    da = torch.where(ok, num - a[..., None], 0.0)
    db = torch.where(ok, den - b[..., None], 0.0)
    k = n * (n - 1)  # sample covariance / n; NaN/inf when n < 2, masked by callers
    return PairedMoments(
        n, a, b, (da * da).sum(-1) / k, (db * db).sum(-1) / k, (da * db).sum(-1) / k
    )


# ---- Fieller's interval -----------------------------------------------------------------------


def fieller(
    num: Tensor, den: Tensor, *, level: float = 0.95, min_den: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fieller's ``level`` interval for mean(num)/mean(den), t quantile with n - 1 df.

    Returns ``(value, lo, hi, n)`` over the leading dims. Semantics:

    * ``value`` = mean(num) / mean(den) over complete pairs; NaN when no pair is complete or
      ``|mean(den)| < min_den`` (then lo = hi = NaN too: the ratio is undefined).
    * ``n < 2``: ``lo = hi = NaN`` (no interval from one prompt; never zero width).
    * Zero variance (every prompt gives the same pair): ``lo = hi = value`` (legitimate: the
      data show no spread).
    * The denominator is not significantly non-zero at this level (``|mean(den)| / se <=
      t``): the exact Fieller set is unbounded (the whole line, or the line minus an interval);
      reported as ``lo = -inf, hi = +inf``.

    Exact coverage for bivariate-normal pairs at every n >= 2 (inverting the t test of
    ``a - c b``); see ``experiments/ratio_ci_coverage.py`` for non-normal noise.
    """
    m = moments(num, den)
    dfs, inv = torch.unique(m.n - 1, return_inverse=True)  # one quantile per distinct n
    t = t_ppf(1 - (1 - level) / 2, dfs)[inv]
    t2 = t * t
    A = m.b * m.b - t2 * m.vbb
    B = m.a * m.b - t2 * m.vab
    det = (m.vaa * m.vbb - m.vab * m.vab).clamp(min=0)
    # B^2 - A C expanded so the a^2 b^2 terms cancel analytically (no catastrophic cancellation)
    disc = t2 * (m.b * m.b * m.vaa - 2 * m.a * m.b * m.vab + m.a * m.a * m.vbb - t2 * det)
    root = disc.clamp(min=0).sqrt()
    value = m.a / m.b
    lo, hi = (B - root) / A, (B + root) / A
    # rounding must not put the point outside its own interval (zero-variance case)
    lo, hi = torch.minimum(lo, value), torch.maximum(hi, value)
    inf = torch.full_like(lo, float("inf"))
    lo, hi = torch.where(A > 0, lo, -inf), torch.where(A > 0, hi, inf)
    nan = torch.full_like(lo, float("nan"))
    undefined = ~(m.b.abs() >= min_den)  # also catches n == 0 (NaN mean)
    value = torch.where(undefined, nan, value)
    no_ci = undefined | (m.n < 2)
    return value, torch.where(no_ci, nan, lo), torch.where(no_ci, nan, hi), m.n


# ---- tests of the ratio -----------------------------------------------------------------------


def _one_sided_t(mean: Tensor, var_of_mean: Tensor, n: Tensor, greater: bool) -> Tensor:
    """p of H1: E > 0 (``greater``) or E < 0 from a t statistic; zero variance is decided by
    the sign of the mean (p = 0 or 1; a mean of exactly 0 gives 1)."""
    se = var_of_mean.sqrt()
    scale = mean.abs().clamp(min=1e-300)
    exact = se <= 1e-12 * scale  # zero variance up to rounding
    stat = torch.where(exact, torch.zeros_like(mean), mean / torch.where(exact, 1.0, se))
    p = t_sf(stat, n - 1) if greater else t_cdf(stat, n - 1)
    hit = (mean > 0) if greater else (mean < 0)
    p = torch.where(exact, torch.where(hit, 0.0, 1.0).double(), p)
    return torch.where(n >= 2, p, torch.full_like(p, float("nan")))


def ratio_p(
    num: Tensor, den: Tensor, threshold: float, *, alternative: str = "greater"
) -> Tensor:
    """One-sided t p-value that mean(num)/mean(den) > ``threshold`` (``alternative="greater"``)
    or < ``threshold`` (``"less"``), per leading cell.

    Tests ``s * mean(num - threshold * den)`` against 0 with n - 1 df, ``s`` the sign of
    mean(den), and takes the max with the one-sided t p-value that the denominator's mean has
    the sign ``s`` (the ratio's direction is only known if the denominator's sign is). Level
    ``alpha`` exactly for bivariate-normal pairs when the denominator's sign is clear; at most
    ``2 alpha`` in the limit mean(den) -> 0. NaN when n < 2 or no prompt is complete.
    Zero variance: p is 0 or 1 by the sign of the point estimate against the threshold.
    """
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative: expected 'greater' or 'less', got {alternative!r}")
    m = moments(num, den)
    s = torch.where(m.b < 0, -1.0, 1.0).double()
    d = s * (m.a - threshold * m.b)
    p_num = _one_sided_t(d, m.var_of_diff(threshold), m.n, alternative == "greater")
    p_den = _one_sided_t(s * m.b, m.vbb, m.n, True)
    return torch.maximum(p_num, p_den)  # NaN propagates


def tost_p(num: Tensor, den: Tensor, delta: float) -> Tensor:
    """Equivalence (TOST) p-value that ``|mean(num)/mean(den)| < delta``, per leading cell.

    ``max(ratio_p(< delta), ratio_p(> -delta))``: H0 is ``|theta| >= delta``. ``tost_p <=
    alpha`` exactly when the ``1 - 2 alpha`` Fieller interval is bounded and inside
    ``[-delta, delta]``. No floor beyond n >= 2 (it tends to 0 as the prompts agree); NaN when
    n < 2. Correct it across heads with :func:`~lensattr.compare.stats.bh_qvalues`.
    """
    if not delta > 0:
        raise ValueError(f"delta: expected a positive margin, got {delta}")
    return torch.maximum(
        ratio_p(num, den, delta, alternative="less"),
        ratio_p(num, den, -delta, alternative="greater"),
    )
