"""Wiegreffe & Pinter (2019) baselines: uniform attention and frozen attention.

Per unit (a head, or every head of a layer) at the edited rows:

* ``uniform``: each query attends uniformly to its allowed sources;
* ``frozen``: each query takes its attention row from another input (the paired corrupted
  prompt when the task has one, else the next prompt in the set), restricted to this prompt's
  allowed sources and renormalised; a prompt whose borrowed row has no mass there is NaN;
* ``ablated``: the unit's outputs (hook_z) zeroed at those rows: the whole effect of the unit
  there, the reference for the shares below.

``learned_share`` = mean(d_uniform) / mean(d_ablated) (ratio of means over prompts with
Fieller's 95% interval): how much of the unit's effect is lost when learned attention is
replaced by uniform attention, i.e. what the learned attention adds over uniform. 0: uniform
attention would do as well; 1: as bad as removing the unit. NaN where the unit's own effect
|mean(d_ablated)| is below ε (no effect to share, e.g. a head whose backup compensates).
"""

from __future__ import annotations

import time
from typing import cast

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..core.sites import Site
from ..stats.inference import Estimate, ratio_of_means
from .edits import Unit, ablate_hooks, evaluate, units_from
from .setup import Setup, TestTable, prepare, run_edits, unit_columns

__all__ = ["uniform_rows", "attention_baselines", "baselines_from", "FROZEN"]

FROZEN = ("auto", "corrupted", "shift")


def uniform_rows(allowed: Bool[Tensor, "batch query_pos key_pos"], n_heads: int
                 ) -> Float[Tensor, "batch unit_head query_pos key_pos"]:
    """Uniform attention over each row's allowed sources (rows with none stay 0)."""
    a = allowed.float()
    u = a / a.sum(-1, keepdim=True).clamp(min=1)
    return u[:, None].expand(-1, n_heads, -1, -1).clone()


def _frozen_rows(other: Float[Tensor, "batch unit_head query_pos key_pos"],
                allowed: Bool[Tensor, "batch query_pos key_pos"],
                rows: Bool[Tensor, "batch query_pos"]) -> tuple[Tensor, Tensor]:
    """Borrowed rows restricted to the allowed sources and renormalised, and a [batch] bool
    that is False where some edited row has (almost) no borrowed mass left."""
    p = torch.where(allowed[:, None], other, 0.0)
    mass = p.sum(-1, keepdim=True)
    ok = ~((mass[..., 0] < 1e-6) & rows[:, None]).flatten(1).any(1)
    return p / mass.clamp(min=1e-30), ok


def _frozen_source(s: Setup, frozen: str) -> tuple[list[Tensor], str]:
    if frozen not in FROZEN:
        raise ValueError(f"frozen: expected one of {FROZEN}, got {frozen!r}")
    if frozen == "corrupted" and s.prompts.corrupted is None:
        raise ValueError("frozen: 'corrupted' needs a task with corrupted prompts")
    if frozen in ("auto", "corrupted") and s.prompts.corrupted is not None:
        c = s.prompts.corrupted_view()
        st = s.adapter.cache(c.tokens, c.attention_mask, sites=(Site.PATTERN,))
        return [st[(Site.PATTERN, li)].float().cpu() for li in range(s.adapter.n_layers)], \
            "corrupted prompt"
    shift = torch.roll(torch.arange(len(s.prompts)), -1)
    return [p[shift] for p in s.clean.patterns], "next prompt"


def baselines_from(s: Setup, units: list[Unit], frozen: str = "auto") -> TestTable:
    t0 = time.perf_counter()
    other, source = _frozen_source(s, frozen)
    frames, summary = [], []
    for unit in units:
        heads = list(unit.heads)
        uni = uniform_rows(s.allowed, len(heads))
        fro, fro_ok = _frozen_rows(other[unit.layer][:, heads], s.allowed, s.rows)
        runs = run_edits(s, unit, torch.stack([uni, fro]))
        ab = evaluate(s.adapter, s.prompts, s.metric, ablate_hooks(unit, s.rows),
                      clean_values=s.clean.values)
        d_abl = ab.metric.cpu() - s.clean.metric
        d_fro = torch.where(fro_ok, runs.delta[1], torch.nan)
        b = len(s.prompts)
        frames.append(pd.DataFrame({
            **{k: [v] * b for k, v in unit_columns(unit).items()},
            "prompt": range(b), "metric_clean": s.clean.metric.numpy(),
            "d_uniform": runs.delta[0].numpy(), "d_frozen": d_fro.numpy(),
            "d_ablated": d_abl.numpy(), "tvd_uniform": runs.tvd[0].numpy(),
            "tvd_frozen": torch.where(fro_ok, runs.tvd[1], torch.nan).numpy()}))
        row = {**unit_columns(unit), "d_uniform": float(runs.delta[0].mean()),
               "d_frozen": float(d_fro.nanmean()), "d_ablated": float(d_abl.mean())}
        for name, d in (("learned_share", runs.delta[0]), ("frozen_share", d_fro)):
            est = cast(Estimate, ratio_of_means(d.double(), d_abl.double(), min_den=s.eps))  # 1-d
            row.update({name: est.value, f"{name}_lo": est.lo, f"{name}_hi": est.hi})
        summary.append(row)
    meta = {**s.meta(), "test": "baselines", "frozen_source": source,
            "reference": "unit's head outputs (hook_z) zeroed at the edited rows",
            "seconds": time.perf_counter() - t0,
            "frame": "one row per (unit, prompt); d_* = metric(edit) - metric(clean)"}
    return TestTable("baselines", pd.concat(frames, ignore_index=True), pd.DataFrame(summary),
                     meta=meta)


def attention_baselines(model, task, metric=None, heads=None, layers=None, n_prompts=None,
                        seed: int = 0, rows: str = "read", frozen: str = "auto",
                        batch_size: int = 64) -> TestTable:
    """Uniform and frozen attention against the learned attention, per head and layer."""
    s = prepare(model, task, metric, n_prompts, seed, rows, None, batch_size)
    return baselines_from(s, units_from(s.adapter, heads, layers), frozen)
