"""Direct logit attribution as audit columns: each head's direct effect on the metric and the
source token it came from.

``dla``: the head's term of :func:`~lensattr.evidence.dla.direct_logit_attribution` at the
read position (final norm's scale frozen from the clean run), mean over prompts.
``dla_top_source``: the source whose per-source term alpha[read, s] v[s] W_O . d (the
decomposition of :func:`~lensattr.evidence.decomposition.source_dla`, computed here from the
clean run's cached patterns and values) carries most of the head's direct effect, in its sign,
named by role (the most common over prompts); ``dla_top_share``: that source's term over the
head's DLA, mean over prompts. Decoders with a linear logit metric only: elsewhere (post-norm
encoders, metrics that are not linear in a few logits) the columns are NaN/"" and
``HeadDLA.reason`` says why. Direct vs total effect and compensation stay where the verdicts
compute them (``direct_effect``, ``direct_minus_total``, ``compensated_under``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.metric import MetricError
from ..core.prompts import PromptSet
from ..models.adapter import Adapter, ModelError
from .decomposition import source_terms_along
from .dla import direct_logit_attribution

__all__ = ["HeadDLA", "head_dla", "QUIET"]

QUIET = 1e-3


@dataclass
class HeadDLA:
    """``columns[head]``: ``{"dla", "dla_top_source", "dla_top_share"}``; ``reason``: why they
    are NaN (empty when computed)."""

    columns: dict
    reason: str = ""

    def row(self, head) -> dict:
        return self.columns.get(head, {"dla": math.nan, "dla_top_source": "",
                                       "dla_top_share": math.nan})


def head_dla(adapter: Adapter, prompts: PromptSet, metric, heads, patterns: list[Tensor],
             values: list[Tensor], name_of) -> HeadDLA:
    """DLA columns for ``heads``; ``patterns`` / ``values``: the clean run's per-layer
    ``[batch, head, q, k]`` patterns and ``[batch, pos, kv_head, d_head]`` values;
    ``name_of(positions, prompt_mask) -> str`` names a source by role (the most common over
    the prompts in ``prompt_mask``). Prompts where the head's |DLA| is below ``QUIET`` times the
    largest component's are left out of the top source (its sign is noise there)."""
    try:
        dla = direct_logit_attribution(adapter, prompts, metric)
    except (ModelError, MetricError) as err:
        return HeadDLA({}, f"not computed: {err}")
    pos = metric.readout(prompts).positions.cpu()
    rows = torch.arange(len(prompts))
    d = dla.direction.double()  # [batch, d_model]
    scale = dla.values.double().abs().max(1).values  # [batch]: the largest component
    cols = {}
    for h in heads:
        total = dla.values[:, dla.index("head", layer=h.layer, head=h.head)].double()  # [batch]
        W_O = adapter.W_O(h.layer).detach().double().cpu()
        along = source_terms_along(patterns[h.layer].double().cpu(),
                                   values[h.layer].double().cpu(), W_O, h.head, d)
        per_src = along[rows, pos]  # [batch, k]
        signed = per_src * torch.where(total < 0, -1.0, 1.0)[:, None]
        top = signed.argmax(-1)  # [batch]
        live = total.abs() > QUIET * scale  # a head with no direct effect has no top source
        if not live.any():
            cols[h] = {"dla": float(total.mean()), "dla_top_source": "(no direct effect)",
                       "dla_top_share": math.nan}
            continue
        share = per_src[rows, top] / total
        cols[h] = {"dla": float(total.mean()), "dla_top_source": name_of(top[live], live),
                   "dla_top_share": float(share[live].mean())}
    return HeadDLA(cols)
