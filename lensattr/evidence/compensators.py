"""Who compensates a head: every component's direct effect re-measured after ablating it.

Direct vs total effect. Ablating head h under a baseline changes the metric by its *total*
effect; removing only h's direct path (the engine's ``direct-<baseline>`` intervention, final
norm scale frozen) changes it by its *direct* effect, which is exactly the change of h's own
DLA term (:mod:`.dla`). The verdicts call a head ``compensated`` when the sign-aware
direct - total exceeds tau (``lensattr.compare.judge._compensations``, same quantity, per
baseline). This module names *who* makes up the difference: the ablated run is decomposed along
the clean run's readout direction (the same frozen scale), so for every prompt

    total = direct(h) + sum over other components of their DLA change + rescale

where ``rescale`` is what the final norm's own change of scale adds (the one term not frozen).
The heads whose DLA grows the most in the direction h's loss took are its compensators.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.sites import Site
from ..core.types import AblationMethod, HeadId
from ..core.version import __version__
from .dla import Component, capture, check_direct_path, decompose, linear_weights, readout_direction
from .engine import Engine
from .hooks import METHOD_CODE

__all__ = ["Compensators", "compensators"]


@dataclass
class Compensators:
    """DLA of every component on the clean run and with ``head`` ablated under ``baseline``.

    clean, ablated: ``[batch, component]`` (``components`` names the columns; the final norm's
    scale is the clean one in both). total: ``[batch]`` metric change of the ablation;
    direct: ``[batch]`` change of the head's own DLA (= the engine's ``direct-<baseline>``
    effect on the metric); rescale: ``[batch]`` the rest, from the norm's changed scale.
    sign: +1 when the head's direct effect raises the metric (ablation lowers it), else -1;
    a component's *compensation* is ``sign * (ablated - clean)``: positive when it pushes back.
    """

    head: HeadId
    baseline: AblationMethod
    components: list[Component]
    clean: Float[Tensor, "batch component"]
    ablated: Float[Tensor, "batch component"]
    total: Float[Tensor, " batch"]
    direct: Float[Tensor, " batch"]
    rescale: Float[Tensor, " batch"]
    sign: float
    meta: dict = field(default_factory=dict)

    @property
    def direct_minus_total(self) -> Float[Tensor, " batch"]:
        """direct - total per prompt, in metric units: the quantity whose sign-aware,
        normalised form (divided by the effect reference, times the sign of the direct effect)
        the verdicts test for ``compensated`` (``compare/judge.py::_compensations``)."""
        return self.direct - self.total

    @property
    def delta(self) -> Float[Tensor, "batch component"]:
        return self.ablated - self.clean

    def to_frame(self) -> pd.DataFrame:
        """One row per component (the ablated head marked ``role="ablated"``) plus a row for the
        final norm's rescaling; sorted by mean compensation, largest first. ``delta`` summed
        over every row equals ``total`` (per prompt: ``p<i>``)."""
        rows = []
        d = self.delta
        for i, c in enumerate(self.components):
            ablated = c.kind == "head" and (c.layer, c.head) == self.head
            rows.append(self._row(c.kind, c.name, c.layer, c.head, d[:, i],
                                  "ablated" if ablated else "candidate",
                                  self.clean[:, i], self.ablated[:, i]))
        nan = torch.full_like(self.rescale, float("nan"))
        rows.append(self._row("norm", "rescale", None, None, self.rescale, "norm", nan, nan))
        f = pd.DataFrame(rows)
        return f.sort_values("compensation", ascending=False, kind="stable").reset_index(
            drop=True)

    def _row(self, kind, name, layer, head, delta, role, clean, ablated) -> dict:
        row = {"kind": kind, "name": name,
               "layer": float("nan") if layer is None else layer,
               "head": float("nan") if head is None else head, "role": role,
               "clean": float(clean.mean()), "ablated": float(ablated.mean()),
               "delta": float(delta.mean()),
               "compensation": float(self.sign * delta.mean())}
        row.update({f"p{b}": float(v) for b, v in enumerate(delta)})
        return row

    def top_heads(self, k: int = 3) -> list[HeadId]:
        """The ``k`` other heads with the largest mean compensation (positive only)."""
        f = self.to_frame()
        f = f[(f.kind == "head") & (f.role == "candidate") & (f.compensation > 0)]
        return [HeadId(int(r.layer), int(r.head)) for r in f.head(k).itertuples()]


def compensators(engine_or_model, prompts=None, metric=None, head=None,
                 baseline: AblationMethod | str = AblationMethod.ZERO) -> Compensators:
    """Ablate ``head`` under ``baseline`` and re-measure every component's direct effect.

    ``engine_or_model``: an :class:`~lensattr.evidence.Engine` (its prompts, metric and
    reference runs are used; ``prompts`` / ``metric`` may be omitted) or a model, with
    ``prompts`` and ``metric``. Mean and resample ablation use the engine's means and
    corrupted run, exactly as its ``ablate`` interventions do."""
    if isinstance(engine_or_model, Engine):
        engine = engine_or_model
        if prompts is not None and prompts is not engine.prompts:
            raise ValueError("prompts: differ from the engine's; pass None to use them")
        if metric is not None and metric is not engine.metric:
            raise ValueError("metric: differs from the engine's; pass None to use it")
    else:
        if prompts is None or metric is None:
            raise ValueError("prompts, metric: needed when a model (not an Engine) is given")
        engine = Engine(engine_or_model, prompts, metric, progress=False)
    a, prompts, metric = engine.adapter, engine.prompts, engine.metric
    check_direct_path(a)
    h = a.check_head(head, "head")
    try:
        method = AblationMethod(baseline)
    except ValueError:
        raise ValueError(f"baseline: expected one of {[m.value for m in AblationMethod]}, "
                         f"got {baseline!r}") from None
    engine._check_method(method, "baseline")
    readout = engine.readout
    weights = linear_weights(metric, prompts, readout)
    n = len(prompts)
    raw0, store0 = capture(a, prompts, readout)
    rd = readout_direction(a, store0[(Site.LN_FINAL_SCALE, None)], readout, weights)
    clean, comps = decompose(a, store0, rd)
    codes = torch.zeros(n, prompts.n_pos, a.n_heads, dtype=torch.long)  # [batch, pos, head]
    codes[:, :, h.head] = METHOD_CODE[method]
    zhook = engine._z_hook(h.layer, codes.to(engine.device), torch.arange(n))
    raw1, store1 = capture(a, prompts, readout, {(Site.Z, h.layer): zhook})
    ablated, _ = decompose(a, store1, rd)  # the clean run's frozen scale
    clean, ablated = clean.float().cpu(), ablated.float().cpu()
    m0 = metric.compute(raw0.float(), prompts, None).float().cpu()
    m1 = metric.compute(raw1.float(), prompts, None).float().cpu()
    total = m1 - m0
    i = next(k for k, c in enumerate(comps)
             if c.kind == "head" and (c.layer, c.head) == (h.layer, h.head))
    direct = ablated[:, i] - clean[:, i]
    rescale = total - (ablated - clean).sum(1)
    ref = float(direct.mean()) if abs(float(direct.mean())) > 1e-9 else float(total.mean())
    sign = -1.0 if ref > 0 else 1.0  # ablation lowering the metric: the head raised it
    meta = {"method": "compensators", "model": a.name, "head": str(h),
            "baseline": method.value, "metric": metric.describe(), "n_prompts": n,
            "frozen_scale": "clean run (both runs)",
            "direct_minus_total": "as compare/judge.py::_compensations, per baseline",
            "lensattr_version": __version__}
    return Compensators(h, method, comps, clean, ablated, total, direct, rescale, sign, meta)
