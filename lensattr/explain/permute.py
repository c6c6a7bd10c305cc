"""Permuted attention (Jain & Wallace 2019): scramble each edited query row's attention weights
over its allowed sources, many times, and measure how much the output moves.

Each draw applies an independent random permutation to every edited row of every head of the
unit (the weights stay the same multiset, so every row still sums to one and the mask is kept).
Reported per (unit, draw, prompt): the metric change and the total-variation distance of the
next-token distribution at the metric's position; per unit: their medians and maxima and the
share of draws that leave the metric within ε ("unchanged"). A scrambled row that moves a
head's small but real share is reported as it comes out, never assumed harmless.
"""

from __future__ import annotations

import time

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .edits import Unit, units_from
from .setup import Setup, TestTable, prepare, run_edits, unit_columns

__all__ = ["permute_rows", "permuted_attention", "permuted_from"]


def permute_rows(
    pattern: Float[Tensor, "batch unit_head query_pos key_pos"],
    allowed: Bool[Tensor, "batch query_pos key_pos"],
    n: int,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "draw batch unit_head query_pos key_pos"]:
    """``n`` draws of ``pattern`` with every row's weights randomly permuted among its allowed
    sources (disallowed entries are 0 in the result)."""
    b, u, q, k = pattern.shape
    ok = allowed[None, :, None].expand(n, b, u, q, k)
    p = torch.where(ok, pattern[None].expand(n, b, u, q, k), 0.0)
    pos = torch.arange(k, dtype=torch.float32).expand(n, b, u, q, k)
    rand = torch.rand(n, b, u, q, k, generator=generator)
    inf = torch.tensor(float("inf"))
    order = torch.argsort(torch.where(ok, pos, inf), -1)  # allowed positions first, in order
    shuffled = torch.argsort(torch.where(ok, rand, inf), -1)  # allowed positions, shuffled
    return torch.zeros_like(p).scatter(-1, order, p.gather(-1, shuffled))


def permuted_from(s: Setup, units: list[Unit], n_permutations: int = 100,
                  seed: int = 0) -> TestTable:
    if not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations: expected an integer >= 1, got {n_permutations!r}")
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    frames, rows = [], []
    for unit in units:
        new = permute_rows(s.clean.unit_pattern(unit), s.allowed, n_permutations, g)
        runs = run_edits(s, unit, new)
        d, b = runs.delta.shape
        frames.append(pd.DataFrame({
            **{k: [v] * (d * b) for k, v in unit_columns(unit).items()},
            "draw": torch.arange(d).repeat_interleave(b).numpy(),
            "prompt": torch.arange(b).repeat(d).numpy(),
            "delta": runs.delta.reshape(-1).numpy(), "tvd": runs.tvd.reshape(-1).numpy(),
        }))
        a = runs.delta.abs()
        rows.append({**unit_columns(unit), "n_draws": d, "n_prompts": b,
                     "delta_mean": float(runs.delta.mean()),
                     "abs_delta_median": float(a.median()), "abs_delta_max": float(a.max()),
                     "frac_unchanged": float((a < s.eps).float().mean()),
                     "tvd_median": float(runs.tvd.nanmedian()) if runs.tvd.isfinite().any()
                     else float("nan"),
                     "tvd_max": float(runs.tvd.nan_to_num(-1).max().clamp(min=0))
                     if runs.tvd.isfinite().any() else float("nan")})
    meta = {**s.meta(), "test": "permuted", "n_permutations": n_permutations, "seed": seed,
            "seconds": time.perf_counter() - t0,
            "frame": "one row per (unit, draw, prompt); delta = metric(permuted) - metric(clean)"}
    return TestTable("permuted", pd.concat(frames, ignore_index=True), pd.DataFrame(rows),
                     meta=meta)


def permuted_attention(model, task, metric=None, heads=None, layers=None,
                       n_permutations: int = 100, n_prompts=None, seed: int = 0,
                       rows: str = "read", eps: float | None = None,
                       batch_size: int = 64) -> TestTable:
    """Permuted-attention test on ``heads`` (default every head) and ``layers`` (every head
    of the layer scrambled at once). ``eps``: the metric change counted as "unchanged"."""
    s = prepare(model, task, metric, n_prompts, seed, rows, eps, batch_size)
    return permuted_from(s, units_from(s.adapter, heads, layers), n_permutations, seed)
