"""Intervals after selection: Benjamini-Yekutieli false-coverage-rate (FCR) levels.

A verdict reads intervals (the effect e, the routing ratio rho) only on heads that a test
across heads selected (BH q < alpha). Marginal 95% intervals on selected heads need not cover
95% of the time: selection picks the heads whose estimates came out large, and when an
interval's pivot is correlated with the selection statistic (the same prompts, the same
ablation run) the selected intervals under-cover. Benjamini & Yekutieli (2005, JASA 100:71-81,
"False discovery rate-adjusted multiple confidence intervals for selected parameters"):

    if R of m parameters are selected, give each selected one its marginal interval at level
    1 - alpha * R / m; then the false coverage rate E[#selected not covered / max(R, 1)]
    is <= alpha,

for any selection rule whose R does not change when one selected estimate moves while staying
selected ("simple" rules: BH rejections, and BH rejections further filtered by a condition on
the head's own estimate), when the heads' estimates are independent (for BH selection also
under positive regression dependence). The guarantee needs only each marginal interval's exact
coverage, not any model of the selection: Fieller's interval
(:func:`lensattr.compare.stats.ratio_of_means`) is exact for bivariate-normal prompts.
``experiments/fcr_simulation.py`` measures the rates on the verdict pipeline: the label false
rate stays far below alpha on a realistic head mix with either interval (FCR halves it, for
6-23% fewer labels), and on a worst-case mix the rate among the rare routing labels exceeds
alpha even with FCR intervals (BY bounds missed intervals per selected head, not false labels
per label).

* :func:`fcr_level` - the BY level 1 - alpha * R / m.
* :func:`fcr_estimates` - Fieller estimates of many cells, at the FCR level on the selected
  cells and at 1 - alpha on the others.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor

from .inference import Estimate, ratio_of_means

__all__ = ["fcr_level", "fcr_estimates"]


def fcr_level(alpha: float, n_selected: int, n_tested: int) -> float:
    """Benjamini-Yekutieli FCR-adjusted confidence level ``1 - alpha * R / m`` for each of the
    ``R = n_selected`` parameters selected out of ``m = n_tested``.

    ``R = 0`` (nothing selected) or ``m = 0`` (nothing tested): the marginal level
    ``1 - alpha`` (no selected interval exists to adjust; this is the level the unselected
    cells are reported at). ``R = m``: also ``1 - alpha`` (selecting everything is no
    selection). Examples: alpha 0.05, 10 of 144 heads: 1 - 0.05 * 10 / 144 = 0.99653; 1 of 270:
    0.99981. ``m`` is the size of the family the selection ran over (the heads whose test was
    defined: the non-NaN entries BH counted), not the number of heads shown.

    Raises ``ValueError`` for ``alpha`` outside (0, 1), negative counts or ``R > m``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: expected in (0, 1), got {alpha}")
    r, m = int(n_selected), int(n_tested)
    if r != n_selected or m != n_tested or r < 0 or m < 0:
        raise ValueError(f"n_selected, n_tested: expected counts >= 0, got {n_selected}, "
                         f"{n_tested}")  # fmt: skip
    if r > m:
        raise ValueError(f"n_selected ({r}) exceeds n_tested ({m})")
    if r == 0 or m == 0:
        return 1.0 - alpha
    return 1.0 - alpha * r / m


def fcr_estimates(
    num: Tensor | list[Tensor],
    den: Tensor | list[Tensor],
    selected: Tensor | list[bool],
    alpha: float = 0.05,
    *,
    n_tested: int | None = None,
    min_den: float = 1e-6,
) -> list[Estimate]:
    """Per cell, mean(num) / mean(den) with Fieller's interval: at the FCR level
    :func:`fcr_level` ``(alpha, R, m)`` on the selected cells, at ``1 - alpha`` on the others.

    ``num``: ``[cells, batch]`` (or a list of ``[batch]`` tensors); ``den``: ``[batch]``
    (shared), ``[cells, batch]`` or a list. ``selected``: bool per cell (``R`` = its sum).
    ``n_tested``: ``m``, the size of the family the selection ran over; default: the number
    of cells. Pass it when the cells are a subset (e.g. rho is computed only for heads whose
    effect cleared the margin, out of all heads BH tested). Values, NaN handling and the
    ``per_prompt`` shares are those of :func:`ratio_of_means` (NaN prompts dropped pairwise; a
    cell with no complete prompt or an undefined ratio gives NaN; an interval unbounded at the
    higher level gives +-inf), so a selected cell equals ``ratio_of_means(num[i], den[i],
    level=fcr_level(...))`` exactly and contains its marginal interval. No cell: ``[]``.
    """
    nums = torch.stack(list(num)) if isinstance(num, list) else num
    if isinstance(den, list):
        den = torch.stack(list(den))
    if nums.ndim != 2:
        raise ValueError(f"num: expected [cells, batch], got shape {tuple(nums.shape)}")
    sel = torch.as_tensor(selected, dtype=torch.bool).flatten()
    if sel.numel() != nums.shape[0]:
        raise ValueError(f"selected: expected {nums.shape[0]} entries, got {sel.numel()}")
    if nums.shape[0] == 0:
        return []
    m = nums.shape[0] if n_tested is None else n_tested
    level = fcr_level(alpha, int(sel.sum()), m)
    nums, dens = torch.broadcast_tensors(nums.double(), den.double())
    # nums is [cells, batch]: ratio_of_means gives one Estimate per cell
    marginal = cast(list[Estimate], ratio_of_means(nums, dens, level=1.0 - alpha, min_den=min_den))
    if not sel.any() or math.isclose(level, 1.0 - alpha):
        return marginal
    idx = sel.nonzero().flatten()
    adjusted = cast(list[Estimate], ratio_of_means(nums[idx], dens[idx], level=level,
                                                   min_den=min_den))
    for i, est in zip(idx.tolist(), adjusted, strict=True):
        marginal[i] = est
    return marginal
