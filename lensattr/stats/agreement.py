"""Rank agreement between any claim and any evidence: Spearman's rho and Kendall's tau-b, with
bootstrap confidence intervals over prompts, per layer and over all layers.

Two ways to pair them (``how``):

* ``"mean"`` (default; e.g. per-head claim scores vs per-head effects): average each item over
  the prompts, then rank-correlate the items. The bootstrap resamples prompts and recomputes
  the means and the correlation.
* ``"per_prompt"`` (e.g. per-token importances, whose items differ between prompts): the
  correlation within each prompt, averaged over prompts; the bootstrap resamples prompts.

Ties get average ranks (Spearman) and the tau-b correction (Kendall), as in scipy. Items that
are NaN are left out (for ``"mean"``: NaN on every prompt; for ``"per_prompt"``: on that
prompt). A correlation over fewer than 3 items, or with a constant side, is NaN.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.precision import half_rounding

__all__ = ["rank_agreement", "spearman", "kendall", "EFFECT_NOISE", "noise_floor",
           "floor_effects"]

# Relative size (of the metric's scale) of the differences float32 rounding makes between two
# exact ways of computing one intervention (the hook-free and bridge engines agree within it).
EFFECT_NOISE = 2e-5


def noise_floor(m0: Tensor, den: Tensor, dtype: torch.dtype | None = None) -> float:
    """The smallest normalised effect (e = (m_int - m0) / mean(den)) that is not rounding:
    ``noise * (max |m0| + 1) / |mean(den)|``, ``noise`` being ``EFFECT_NOISE`` in float32 and,
    for a model in half precision (``dtype``), the larger
    :func:`~lensattr.core.precision.half_rounding`. Effects below it are ranked as 0, so rank
    statistics do not order rounding noise (inf when the reference does not move the metric)."""
    noise = max(EFFECT_NOISE, half_rounding(dtype) or 0.0)
    d = float(den.double().mean().abs())
    scale = float(m0.double().abs().max()) + 1.0 if m0.numel() else 1.0
    return noise * scale / d if d > 0 else float("inf")


def floor_effects(x: Tensor, floor: float) -> Tensor:
    """``x`` with entries of magnitude below ``floor`` set to 0 (NaN kept)."""
    return torch.where(x.abs() < floor, torch.zeros_like(x), x)

HOW = ("mean", "per_prompt")
_MAX_ELEMS = 2**20  # pairwise matrices per chunk of bootstrap replicates (8 MB of doubles)


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (1-based) along the last axis, ties sharing their mean rank: #less +
    (#equal + 1) / 2, counted by binary search in the sorted values (O(n log n), not n^2)."""
    s = x.sort(-1).values.contiguous()
    less = torch.searchsorted(s, x.contiguous(), right=False)
    equal = torch.searchsorted(s, x.contiguous(), right=True) - less
    return less.double() + (equal.double() + 1) / 2.0


def spearman(x: Float[Tensor, "... n"], y: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """Spearman's rho along the last axis (batched; no NaN inside)."""
    rx, ry = _ranks(x.double()), _ranks(y.double())
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    den = (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()
    rho = (rx * ry).sum(-1) / den
    return torch.where((den > 0) & (x.shape[-1] >= 3), rho, torch.nan)


def kendall(x: Float[Tensor, "... n"], y: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """Kendall's tau-b along the last axis (batched; no NaN inside)."""
    sx = torch.sign(x.double()[..., :, None] - x.double()[..., None, :])
    sy = torch.sign(y.double()[..., :, None] - y.double()[..., None, :])
    den = (sx.abs().sum((-1, -2)) * sy.abs().sum((-1, -2))).sqrt()
    tau = (sx * sy).sum((-1, -2)) / den
    return torch.where((den > 0) & (x.shape[-1] >= 3), tau, torch.nan)


def _chunked(fn, x: Tensor, y: Tensor) -> Tensor:
    n = x.shape[-1]
    step = max(1, _MAX_ELEMS // max(1, n * n))
    return torch.cat([fn(x[i:i + step], y[i:i + step]) for i in range(0, x.shape[0], step)])


def _boot_means(x: Tensor, idx: Tensor) -> Tensor:
    """``x[idx].nanmean(1)`` [n_boot, items] without the [n_boot, batch, items] tensor: each
    replicate's draw counts per prompt times the values (NaN where a replicate drew no finite
    value of an item)."""
    if torch.isinf(x).any():  # 0 draws x inf would be NaN: the direct way (rare)
        return x[idx].nanmean(1)
    counts = torch.zeros(idx.shape[0], x.shape[0], dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float64))
    finite = ~torch.isnan(x)
    return (counts @ torch.where(finite, x, 0.0)) / (counts @ finite.double())


def _ci(boot: Tensor, level: float) -> tuple[float, float]:
    boot = boot[~torch.isnan(boot)]
    if boot.numel() == 0:
        return float("nan"), float("nan")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=boot.dtype)
    lo, hi = torch.quantile(boot, q).tolist()
    return lo, hi


def _group(c: Tensor, e: Tensor, how: str, idx: Tensor, level: float) -> dict:
    """c, e: [batch, items]; idx: [n_boot, batch] bootstrap draws of prompts."""
    if how == "mean":
        keep = ~(torch.isnan(c).all(0) | torch.isnan(e).all(0))
        c, e = c[:, keep], e[:, keep]
        point = (spearman(c.nanmean(0), e.nanmean(0)), kendall(c.nanmean(0), e.nanmean(0)))
        cb, eb = _boot_means(c, idx), _boot_means(e, idx)  # [n_boot, items]
        ok = ~(torch.isnan(cb).any(-1) | torch.isnan(eb).any(-1))
        boot = [torch.where(ok, _chunked(f, cb.nan_to_num(), eb.nan_to_num()), torch.nan)
                for f in (spearman, kendall)]
        n_items = int(keep.sum())
    else:
        rows = []
        for ci_, ei_ in zip(c, e, strict=True):
            ok = ~(torch.isnan(ci_) | torch.isnan(ei_))
            rows.append(torch.stack([spearman(ci_[ok], ei_[ok]), kendall(ci_[ok], ei_[ok])]))
        per = torch.stack(rows)  # [batch, 2]
        point = tuple(per.nanmean(0))
        boot = [per[idx, j].nanmean(1) for j in range(2)]
        n_items = int((~(torch.isnan(c) | torch.isnan(e))).sum(1).float().mean())
    (rl, rh), (tl, th) = _ci(boot[0], level), _ci(boot[1], level)
    return {"n_items": n_items, "rho": float(point[0]), "rho_lo": rl, "rho_hi": rh,
            "tau": float(point[1]), "tau_lo": tl, "tau_hi": th}


def rank_agreement(
    claim: Float[Tensor, "batch ..."],
    evidence: Float[Tensor, "batch ..."],
    layer_dim: int | None = None,
    how: str = "mean",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Spearman and Kendall agreement of ``claim`` with ``evidence`` (same shape, prompts on
    axis 0), with percentile bootstrap CIs over prompts.

    ``layer_dim``: the axis (of the full tensors, e.g. 1 for ``[batch, layer, head]``) that
    indexes layers: one row per layer and one over all layers (``layer`` = <NA>). Without it,
    one row over all items. Columns: layer, how, n_prompts, n_items, rho, rho_lo, rho_hi,
    tau, tau_lo, tau_hi.
    """
    if how not in HOW:
        raise ValueError(f"how: expected one of {HOW}, got {how!r}")
    c = torch.as_tensor(claim).detach().double().cpu()
    e = torch.as_tensor(evidence).detach().double().cpu()
    if c.shape != e.shape:
        raise ValueError(f"claim and evidence: shapes differ, {tuple(c.shape)} vs "
                         f"{tuple(e.shape)}")
    if c.ndim < 2:
        raise ValueError("claim: expected [batch, ...] with at least one item axis")
    if layer_dim is not None and not 1 <= layer_dim < c.ndim:
        raise ValueError(f"layer_dim: expected an axis in 1..{c.ndim - 1}, got {layer_dim}")
    b = c.shape[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, b, (n_boot, b), generator=g)
    groups: list[tuple[int | None, Tensor, Tensor]] = []
    if layer_dim is not None:
        cl, el = c.movedim(layer_dim, 1), e.movedim(layer_dim, 1)
        groups += [(li, cl[:, li].reshape(b, -1), el[:, li].reshape(b, -1))
                   for li in range(cl.shape[1])]
    groups.append((None, c.reshape(b, -1), e.reshape(b, -1)))
    rows = [{"layer": li, "how": how, "n_prompts": b, **_group(cg, eg, how, idx, level)}
            for li, cg, eg in groups]
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")
    return frame
