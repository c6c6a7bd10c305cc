"""What every explanation test shares: the model, prompts, metric, clean run, allowed sources,
edited rows and ε, and a batched runner for many attention edits of one unit.

:class:`TestTable` is the one result type of every test function: a tidy per-prompt frame, a
per-unit summary, tensors with documented axes and ``meta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..auditing.plan import resolve_task
from ..core.metric import Metric
from ..core.prompts import PromptSet
from ..models.adapter import Adapter, ModelError
from .edits import ROWS, CleanRun, Unit, allowed_sources, edited_rows, evaluate, override_hooks

__all__ = ["Setup", "prepare", "TestTable", "check_eps", "run_edits"]


def check_eps(eps) -> float:
    """ε must be a finite number > 0 (in the metric's own units)."""
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps: expected a number > 0 (in the metric's units), got {eps!r}"
                         ) from None
    if not math.isfinite(e) or e <= 0:
        raise ValueError(f"eps: expected a finite number > 0 (in the metric's units), got {eps!r}")
    return e


@dataclass
class Setup:
    adapter: Adapter
    prompts: PromptSet
    metric: Metric
    task_name: str
    clean: CleanRun
    allowed: Tensor  # [batch, query_pos, key_pos] bool
    rows: Tensor  # [batch, query_pos] bool: the edited query rows
    rows_kind: str
    eps: float
    batch_size: int

    def meta(self) -> dict:
        return {"model": self.adapter.name, "task": self.task_name,
                "prompts_hash": self.prompts.hash(), "n_prompts": len(self.prompts),
                "metric": self.metric.describe(), "rows": self.rows_kind, "eps": self.eps,
                "edit_site": "pattern" if self.adapter.pattern_editable else "z = pattern @ v"}


def prepare(model, task, metric=None, n_prompts=None, seed: int = 0, rows: str = "read",
            eps: float | None = None, batch_size: int = 64) -> Setup:
    """Resolve the inputs and run the clean pass. ``eps`` None: 5% of the mean |clean metric|
    (recorded in ``meta``)."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)  # refuses no-pattern models
    if rows not in ROWS:
        raise ValueError(f"rows: expected one of {ROWS}, got {rows!r}")
    if eps is not None:
        eps = check_eps(eps)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    prompts, metric, name = resolve_task(task, metric, n_prompts, seed, adapter.model)
    prompts.validate_vocab(adapter.d_vocab)
    prompts.validate_length(getattr(adapter.cfg, "n_ctx", None))
    clean = CleanRun(adapter, prompts, metric)
    if eps is None:
        scale = float(clean.metric.abs().mean())
        if not scale > 0:
            raise ModelError("eps: the clean metric is 0 on every prompt; give eps explicitly")
        eps = 0.05 * scale
    return Setup(adapter, prompts, metric, name, clean, allowed_sources(adapter, prompts),
                 edited_rows(prompts, metric, rows), rows, eps, batch_size)


@dataclass
class Runs:
    """Metric change and output total-variation distance of D edits on every prompt."""

    delta: Float[Tensor, "draw batch"]  # metric(edit) - metric(clean)
    tvd: Float[Tensor, "draw batch"]  # NaN where the model's logits mean nothing


def run_edits(s: Setup, unit: Unit, new: Float[Tensor, "draw batch unit_head query_pos key_pos"],
              rows: Tensor | None = None) -> Runs:
    """Forward passes with the unit's attention at the edited rows replaced by ``new[d]``
    (draw d, every prompt), in chunks of ``batch_size`` rows."""
    d, b = new.shape[:2]
    rows = s.rows if rows is None else rows
    idx = torch.arange(b).repeat(d)  # row r = draw r // b, prompt r % b
    flat = new.reshape(d * b, *new.shape[2:])
    delta = torch.empty(d * b)
    tvd = torch.full((d * b,), torch.nan)
    for lo in range(0, d * b, s.batch_size):
        sel = idx[lo:lo + s.batch_size]
        hooks = override_hooks(s.adapter, unit, rows[sel], flat[lo:lo + s.batch_size])
        ev = evaluate(s.adapter, s.prompts.take(sel), s.metric, hooks,
                      clean_values=s.clean.values[sel.to(s.clean.values.device)])
        delta[lo:lo + len(sel)] = ev.metric.cpu() - s.clean.metric[sel]
        if ev.probs is not None:
            clean_probs = cast(Tensor, s.clean.probs)  # None only where ev.probs is too
            p0 = clean_probs[sel.to(clean_probs.device)]
            tvd[lo:lo + len(sel)] = 0.5 * (ev.probs - p0).abs().sum(-1).cpu()
    return Runs(delta.reshape(d, b), tvd.reshape(d, b))


@dataclass
class TestTable:
    """One explanation test's result. ``frame``: tidy, one row per (unit, draw, prompt) or
    (unit, prompt); ``summary``: one row per unit; ``tensors``: name -> tensor (axes in
    ``meta["tensor_axes"]``); ``meta``: what was run, with which parameters, how long."""

    name: str
    frame: pd.DataFrame
    summary: pd.DataFrame
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.frame


def unit_columns(unit: Unit) -> dict:
    return {"unit": unit.label, "kind": unit.kind, "layer": unit.layer,
            "head": pd.NA if unit.head is None else unit.head}
