"""Statistics over prompts: ratio-of-means effects with bootstrap CIs, sign-flip p-values, BH.

Reuses TransformerLens's ``derive_generator`` and ``sign_flip_permutation_pvalue``; the
bootstrap here resamples prompts jointly for a numerator and a denominator (a ratio of means),
which TransformerLens's single-statistic ``bootstrap_ci`` does not do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.utilities.statistics import derive_generator, sign_flip_permutation_pvalue

__all__ = ["Estimate", "ratio_of_means", "bh_qvalues", "signflip_p"]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile bootstrap CI and per-prompt values."""

    value: float
    lo: float
    hi: float
    per_prompt: Tensor  # [batch]; NaN where a prompt's own ratio is undefined

    @classmethod
    def nan(cls, n: int) -> Estimate:
        return cls(float("nan"), float("nan"), float("nan"), torch.full((n,), float("nan")))


def ratio_of_means(
    num: Float[Tensor, "... batch"],
    den: Float[Tensor, "... batch"],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    label: str = "",
    min_den: float = 1e-6,
) -> list[Estimate] | Estimate:
    """mean(num) / mean(den) with a bootstrap CI resampling prompts jointly.

    Accepts ``[batch]`` (returns one Estimate) or ``[cells, batch]`` (returns a list). Prompts
    whose numerator is NaN are dropped. When ``|mean(den)| < min_den`` the estimate is NaN.
    """
    single = num.ndim == 1
    num2, den2 = (num[None], den[None]) if single else (num, den)
    if den2.shape[0] == 1 and num2.shape[0] > 1:
        den2 = den2.expand_as(num2)
    gen = derive_generator(seed, "ratio", label)
    out = []
    n = num2.shape[-1]
    idx = torch.randint(0, n, (n_boot, n), generator=gen)  # same resamples for every cell
    for a, b in zip(num2.double(), den2.double(), strict=True):
        ok = torch.isfinite(a) & torch.isfinite(b)
        per = torch.where(b.abs() > min_den, a / b, torch.full_like(a, float("nan")))
        if ok.sum() == 0 or b[ok].mean().abs() < min_den:
            out.append(Estimate(float("nan"), float("nan"), float("nan"), per.float()))
            continue
        a0, b0 = torch.where(ok, a, 0.0), torch.where(ok, b, 0.0)
        w = ok.double()
        point = (a0.sum() / w.sum()) / (b0.sum() / w.sum())
        num_s, den_s, w_s = a0[idx].sum(1), b0[idx].sum(1), w[idx].sum(1)
        good = (w_s > 0) & (den_s.abs() > min_den * w_s.clamp(min=1))
        draws = (num_s[good] / den_s[good]) if good.any() else point[None]
        lo, hi = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=draws.dtype))
        out.append(Estimate(float(point), float(lo), float(hi), per.float()))
    return out[0] if single else out


def signflip_p(x: Float[Tensor, "cells batch"], *, seed: int = 0, n_perm: int = 2000) -> Tensor:
    """Two-sided paired sign-flip permutation p-value that each row's mean is zero."""
    x = torch.nan_to_num(x.double(), nan=0.0)
    return sign_flip_permutation_pvalue(
        x, n_permutations=n_perm, generator=derive_generator(seed, "signflip")
    ).float()


def bh_qvalues(p: Tensor) -> Tensor:
    """Benjamini-Hochberg adjusted p-values (q-values), NaN entries left NaN."""
    flat = p.flatten().double()
    ok = torch.isfinite(flat)
    q = torch.full_like(flat, float("nan"))
    vals = flat[ok]
    m = vals.numel()
    if m:
        order = vals.argsort()
        ranked = vals[order] * m / torch.arange(1, m + 1, dtype=vals.dtype)
        ranked = torch.flip(torch.cummin(torch.flip(ranked, [0]), 0).values, [0]).clamp(max=1)
        res = torch.empty_like(vals)
        res[order] = ranked
        q[ok] = res
    return q.reshape(p.shape).float()
