"""Per-source decomposition of a head's output: out[q] = sum_s alpha[q, s] * v[s] @ W_O.

The terms sum exactly to the head's output (z @ W_O; the output bias is not per head and is
left out), which is why removing a source set S with an edge edit (alpha[q, s] = 0 for s in S,
no renormalising) equals subtracting S's terms.

:func:`source_terms` and :func:`source_terms_along` are pure functions of cached tensors
(pattern, values, W_O); :func:`source_dla` projects the terms at the metric's read position on
the readout direction through the frozen final norm (:mod:`.dla`): which source tokens the
head's direct effect came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.metrics import as_metric
from ..core.prompts import PromptSet
from ..core.sites import Site
from ..core.types import HeadId
from ..core.version import __version__
from ..models.adapter import Adapter
from .dla import capture, check_direct_path, linear_weights, readout_direction

__all__ = ["per_source_terms", "head_output", "source_terms", "source_terms_along",
           "source_dla", "SourceDLA"]


def _head_values(pattern: Tensor, v: Tensor, W_O: Tensor, head: int):
    """(alpha [batch, q, k], v W_O of this head [batch, k, d_model]); the query head reads KV
    head ``head // (n_heads // n_kv_heads)`` (grouped-query attention)."""
    if pattern.ndim != 4 or v.ndim != 4 or W_O.ndim != 3:
        raise ValueError(
            "source_terms: expected pattern [batch, head, q, k], v [batch, k, kv_head, d_head] "
            f"and W_O [head, d_head, d_model]; got {tuple(pattern.shape)}, {tuple(v.shape)}, "
            f"{tuple(W_O.shape)}"
        )
    n_heads, n_kv = pattern.shape[1], v.shape[2]
    if not 0 <= int(head) < n_heads:
        raise ValueError(f"head: {head} out of range; the pattern has heads 0..{n_heads - 1}")
    if n_heads % n_kv or W_O.shape[0] != n_heads:
        raise ValueError(f"source_terms: {n_heads} query heads, {n_kv} KV heads and W_O for "
                         f"{W_O.shape[0]} heads do not fit together")
    kv = int(head) // (n_heads // n_kv)
    vo = v[:, :, kv].to(W_O.dtype) @ W_O[head]  # [batch, k, d_model]
    return pattern[:, head].to(vo.dtype), vo


def source_terms(
    pattern: Float[Tensor, "batch head q k"],
    v: Float[Tensor, "batch k kv_head d_head"],
    W_O: Float[Tensor, "head d_head d_model"],
    head: int,
) -> Float[Tensor, "batch query_pos key_pos d_model"]:
    """alpha[q, s] * v[s] @ W_O for one head (of one layer), every query and source; sums over
    sources to the head's output z @ W_O."""
    a, vo = _head_values(pattern, v, W_O, head)
    return a[..., None] * vo[:, None]  # [batch, q, k, d_model]


def source_terms_along(
    pattern: Float[Tensor, "batch head q k"],
    v: Float[Tensor, "batch k kv_head d_head"],
    W_O: Float[Tensor, "head d_head d_model"],
    head: int,
    direction: Float[Tensor, "batch d_model"],
) -> Float[Tensor, "batch query_pos key_pos"]:
    """:func:`source_terms` projected on ``direction`` (one per prompt), without building the
    ``d_model`` axis: alpha[q, s] * (v[s] @ W_O . direction)."""
    a, vo = _head_values(pattern, v, W_O, head)
    if direction.shape != (vo.shape[0], vo.shape[2]):
        raise ValueError(f"direction: expected shape {(vo.shape[0], vo.shape[2])} "
                         f"[batch, d_model], got {tuple(direction.shape)}")
    along = torch.einsum("bkm,bm->bk", vo, direction.to(vo))  # [batch, k]
    return a * along[:, None, :]  # [batch, q, k]


def _cache(adapter: Adapter, prompts: PromptSet, layer: int):
    store = adapter.cache(
        prompts.tokens, prompts.attention_mask, sites=(Site.PATTERN, Site.V, Site.Z)
    )
    return store[(Site.PATTERN, layer)], store[(Site.V, layer)], store[(Site.Z, layer)]


def per_source_terms(
    model, prompts: PromptSet, head
) -> Float[Tensor, "batch query_pos key_pos d_model"]:
    """alpha[q, s] * v[s] @ W_O for one head, every query and source (one cached run, then
    :func:`source_terms`)."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    h = adapter.check_head(head)
    pattern, v, _ = _cache(adapter, prompts, h.layer)
    return source_terms(pattern, v, adapter.W_O(h.layer), h.head)


def head_output(model, prompts: PromptSet, head: HeadId) -> Float[Tensor, "batch pos d_model"]:
    """The head's output z @ W_O at every position (from hook_z)."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    h = adapter.check_head(head)
    _, _, z = _cache(adapter, prompts, h.layer)
    return torch.einsum("bpd,dm->bpm", z[:, :, h.head], adapter.W_O(h.layer)[h.head])


@dataclass
class SourceDLA:
    """One head's direct contribution to the metric, split by source position.

    values: ``[batch, key_pos]``: alpha[read, s] * v[s] W_O . direction; sums over sources to
    the head's DLA (``head_dla``). pattern: ``[batch, key_pos]`` the attention row at the read
    position (what the map claims). roles: role name -> ``[batch]`` positions, for labels."""

    head: HeadId
    values: Float[Tensor, "batch key_pos"]
    pattern: Float[Tensor, "batch key_pos"]
    head_dla: Float[Tensor, " batch"]
    roles: dict[str, Tensor]
    meta: dict = field(default_factory=dict)

    def by_role(self) -> dict[str, Tensor]:
        """Role name -> ``[batch]`` value at that role's position in each prompt."""
        rows = torch.arange(self.values.shape[0])
        return {k: self.values[rows, pos] for k, pos in self.roles.items()}

    def to_frame(self) -> pd.DataFrame:
        """One row per source position: role (where one sits there on every prompt), mean
        direct contribution, mean attention, and per-prompt values ``p<i>``."""
        rows = []
        for s in range(self.values.shape[1]):
            role = ",".join(k for k, pos in self.roles.items() if bool((pos == s).all()))
            row = {"layer": self.head.layer, "head": self.head.head, "source_pos": s,
                   "role": role, "value": float(self.values[:, s].mean()),
                   "attention": float(self.pattern[:, s].mean())}
            row.update({f"p{b}": float(v) for b, v in enumerate(self.values[:, s])})
            rows.append(row)
        return pd.DataFrame(rows)


def source_dla(model, prompts: PromptSet, metric, head) -> SourceDLA:
    """Which source tokens one head's direct effect on the metric came from: its per-source
    terms at the read position projected on the readout direction (final norm's scale frozen
    from this clean run). Padding sources carry zero attention, hence zero."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    h = adapter.check_head(head, "head")
    metric = as_metric(metric)
    check_direct_path(adapter)
    readout = metric.readout(prompts)
    weights = linear_weights(metric, prompts, readout)
    _, store = capture(adapter, prompts, readout)
    rd = readout_direction(adapter, store[(Site.LN_FINAL_SCALE, None)], readout, weights)
    pattern, v = store[(Site.PATTERN, h.layer)], store[(Site.V, h.layer)]
    W_O = adapter.W_O(h.layer)
    along = source_terms_along(pattern, v, W_O, h.head, rd.direction)  # [batch, q, k]
    rows = torch.arange(len(prompts), device=along.device)
    pos = rd.positions.to(along.device)
    values = along[rows, pos].float().cpu()  # [batch, k]
    z = store[(Site.Z, h.layer)][rows, pos, h.head]  # [batch, d_head]
    head_dla = ((z.to(W_O.dtype) @ W_O[h.head]) * rd.direction.to(W_O.dtype)).sum(-1)
    meta = {"method": "source_dla", "model": adapter.name, "head": str(h),
            "metric": metric.describe(), "n_prompts": len(prompts),
            "frozen_scale": "clean run", "lensattr_version": __version__}
    return SourceDLA(h, values, pattern[rows, h.head, pos].float().cpu(),
                     head_dla.float().cpu(), {k: v.cpu() for k, v in prompts.roles.items()},
                     meta)
