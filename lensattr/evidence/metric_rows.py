"""The metric of a forward pass's readout, guarded: finite inputs, the metric contract
(:func:`lensattr.core.metric.check_metric_output`) and finite values."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.metric import Metric, MetricError, check_metric_output
from ..core.prompts import PromptSet

__all__ = ["check_finite_metric", "metric_rows"]


def check_finite_metric(out: Tensor, name: str) -> None:
    """Refuse NaN or inf among the values metric ``name`` returned."""
    if not torch.isfinite(out).all():
        raise MetricError(f"metric {name!r}: returned NaN or inf")


def metric_rows(metric: Metric, values: Tensor, prompts: PromptSet, clean: Tensor | None,
                invalid: Tensor | None = None) -> Tensor:
    """The metric per row (on the CPU), after checking the readout; rows marked ``invalid``
    (edits that could not be made) are NaN and exempt from the checks. The metric computes
    on the readout's device."""
    n = values.shape[0]
    invalid = (torch.zeros(n, dtype=torch.bool, device=values.device) if invalid is None
               else invalid.to(values.device))
    values = values.float()
    if (~torch.isfinite(values.reshape(n, -1)).all(1) & ~invalid).any():
        raise MetricError(
            "model output: NaN or inf in the logits read by the metric; check the model's "
            "weights, inputs and interventions"
        )
    values[invalid] = 0.0
    out = check_metric_output(metric.compute(values, prompts, clean), n,
                              metric.name).detach().cpu().clone()
    invalid = invalid.cpu()
    check_finite_metric(out[~invalid], metric.name)
    out[invalid] = float("nan")
    return out
