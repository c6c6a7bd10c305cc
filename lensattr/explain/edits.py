"""Attention edits for the explanation tests: which heads, which query rows, which sources are
allowed, hooks that replace a head's attention rows, and a metric evaluation that can carry
gradients.

A :class:`Unit` is one head, or every head of one layer edited together. An edit replaces the
unit's attention rows at the *edited rows* (by default the query positions the metric reads;
``rows="all"``: every real token) by a new distribution over the *allowed sources* (the causal
mask and the padding respected). On models whose hook_pattern edits reach the head outputs
(GPT-2, Llama) the edit goes through :attr:`Site.PATTERN`; where the bridge delegates attention
to the HF module (BERT, ``Adapter.pattern_editable`` False) it goes through hook_z with the
head's values captured in the same forward: ``z[q] = pattern'[q] @ v``, which is what the
module computes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..core.metric import Metric, MetricError
from ..core.metrics import as_metric
from ..core.prompts import PromptSet
from ..core.sites import Site
from ..models.adapter import Adapter, ModelError, after

__all__ = ["Unit", "units_from", "allowed_sources", "edited_rows", "override_hooks",
           "ablate_hooks", "evaluate", "Evaluation", "CleanRun", "ROWS"]

ROWS = ("read", "all")


@dataclass(frozen=True)
class Unit:
    """Heads of one layer whose attention is edited together: one head, or the whole layer."""

    layer: int
    heads: tuple[int, ...]
    kind: str  # "head" or "layer"

    @property
    def head(self) -> int | None:
        return self.heads[0] if self.kind == "head" else None

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.heads[0]}" if self.kind == "head" else f"L{self.layer}"


def units_from(adapter: Adapter, heads=None, layers=None) -> list[Unit]:
    """Units for ``heads`` (HeadIds or (layer, head) pairs; None = every head, [] = none) and
    ``layers`` (layer indices, None = none, "all" = every layer). Bad addresses are refused."""
    out: list[Unit] = []
    head_list = adapter.heads() if heads is None else list(heads)
    for i, h in enumerate(head_list):
        hid = adapter.check_head(h, f"heads[{i}]")
        out.append(Unit(hid.layer, (hid.head,), "head"))
    if layers == "all":
        layers = range(adapter.n_layers)
    for i, layer in enumerate(layers or []):
        try:
            li = operator.index(layer)
        except TypeError:
            raise ValueError(f"layers[{i}]: expected an integer layer, got {layer!r}") from None
        if not 0 <= li < adapter.n_layers:
            raise ValueError(f"layers[{i}]: layer {li} out of range; model {adapter.name!r} has "
                             f"layers 0..{adapter.n_layers - 1}")
        out.append(Unit(li, tuple(range(adapter.n_heads)), "layer"))
    if not out:
        raise ValueError("heads, layers: nothing to test; give at least one head or layer")
    return out


def allowed_sources(
    adapter: Adapter, prompts: PromptSet
) -> Bool[Tensor, "batch query_pos key_pos"]:
    """True where a query may attend a source: a real key, and (causal) not after the query."""
    n = prompts.n_pos
    valid = prompts.valid  # [batch, pos]
    ok = valid[:, None, :] & valid[:, :, None]
    if adapter.is_causal:
        ok = ok & torch.ones(n, n, dtype=torch.bool).tril()[None]
    return ok


def edited_rows(prompts: PromptSet, metric: Metric, rows: str) -> Bool[Tensor, "batch query_pos"]:
    """The query rows an edit replaces: the metric's read positions, or every real token."""
    if rows == "read":
        return metric.read_positions(prompts).cpu() & prompts.valid
    if rows == "all":
        return prompts.valid.clone()
    raise ValueError(f"rows: expected one of {ROWS}, got {rows!r}")


def override_hooks(
    adapter: Adapter,
    unit: Unit,
    rows: Bool[Tensor, "batch query_pos"],
    new: Float[Tensor, "batch unit_head query_pos key_pos"],
) -> dict:
    """Hooks that replace the unit's attention at ``rows`` by ``new`` (one slice per head of
    the unit, in ``unit.heads`` order); other rows and heads are left alone. Differentiable
    in ``new``."""
    heads = list(unit.heads)
    if not adapter.pattern_editable:
        return _z_override(adapter, unit, rows, new)

    def edit(pattern):  # [batch, head_index, query_pos, key_pos]
        r = rows.to(pattern.device)[:, None, :, None]
        out = pattern.clone()
        out[:, heads] = torch.where(r, new.to(pattern.device, pattern.dtype), pattern[:, heads])
        return out

    return {(Site.PATTERN, unit.layer): edit}


def _z_override(adapter: Adapter, unit: Unit, rows: Tensor, new: Tensor) -> dict:
    seen: dict = {}
    kv = [adapter.kv_head(h) for h in unit.heads]

    def grab(v):  # [batch, pos, kv_head, d_head]
        seen["v"] = v
        return v

    def edit(z):  # [batch, pos, head_index, d_head]
        v = seen.pop("v")[:, :, kv]  # [batch, key_pos, unit_head, d_head]
        zn = torch.einsum("buqk,bkud->bqud", new.to(v.device, v.dtype), v)
        out = z.clone()
        r = rows.to(z.device)[:, :, None, None]
        out[:, :, list(unit.heads)] = torch.where(r, zn, z[:, :, list(unit.heads)])
        return out

    return {(Site.V, unit.layer): grab, (Site.Z, unit.layer): edit}


def ablate_hooks(unit: Unit, rows: Bool[Tensor, "batch query_pos"]) -> dict:
    """Zero the unit's head outputs (hook_z) at ``rows``: the reference for 'the whole
    effect' of a unit (its learned attention and its values) at the edited rows."""

    def edit(z):
        r = rows.to(z.device)[:, :, None, None]
        out = z.clone()
        out[:, :, list(unit.heads)] = torch.where(r, 0.0, z[:, :, list(unit.heads)])
        return out

    return {(Site.Z, unit.layer): edit}


@dataclass
class Evaluation:
    """One forward pass read through the metric: ``metric`` [batch]; ``probs`` the next-token
    distribution at the metric's position [batch, d_vocab] (None where logits mean nothing)."""

    metric: Tensor
    values: Tensor
    probs: Tensor | None


def evaluate(adapter: Adapter, prompts: PromptSet, metric: Metric, hooks: dict | None = None,
             clean_values: Tensor | None = None, grad: bool = False,
             is_clean: bool = False) -> Evaluation:
    """Run the model with ``hooks`` (with autograd when ``grad``) and read the metric.
    ``clean_values``: the clean run's readout, for metrics that compare with it (``is_clean``:
    this run is the clean run and is its own reference)."""
    metric = as_metric(metric)
    if metric.needs_clean and clean_values is None and not is_clean:
        raise MetricError(f"metric {metric.name!r} needs the clean run's readout")
    readout = metric.readout(prompts)
    if readout.kind != "hidden" and not adapter.logits_meaningful:
        raise ModelError(f"metric: model {adapter.name!r} has no trained output head; use a "
                         "metric that reads the final hidden states")
    all_hooks = dict(hooks or {})
    store: dict = {}
    key = (Site.BLOCK_OUT, adapter.n_layers - 1)

    def keep(x):
        store["hidden"] = x

    all_hooks[key] = after(all_hooks.get(key), keep)
    kw = {} if prompts.attention_mask is None else {
        "attention_mask": prompts.attention_mask.to(adapter.device)}
    with torch.set_grad_enabled(grad), adapter.hooks(all_hooks):
        logits = adapter.model(prompts.tokens.to(adapter.device), **kw)
        rows = torch.arange(logits.shape[0], device=logits.device)
        pos = (readout.positions if readout.positions is not None else prompts.last_real)
        pos = pos.to(logits.device)
        if readout.kind == "hidden":
            values = store["hidden"]
        elif readout.kind == "all_logits":
            values = logits
        elif readout.kind == "logits":
            values = logits[rows, pos]
        else:
            assert readout.columns is not None  # a "columns" readout names them
            values = logits[rows, pos].gather(1, readout.columns.to(logits.device))
        m = metric.compute(values, prompts, values.detach() if is_clean else clean_values)
        probs = logits[rows, pos].float().softmax(-1) if adapter.logits_meaningful else None
    if not isinstance(m, Tensor) or m.shape != (len(prompts),):
        raise MetricError(f"metric {metric.name!r}: expected one value per prompt "
                          f"({len(prompts)},), got {getattr(m, 'shape', type(m).__name__)}")
    return Evaluation(m.float(), values if grad else values.detach(), probs)


class CleanRun:
    """The clean forward pass every test is measured against: metric values, the metric's
    readout (for metrics that compare with the clean run), output distribution, and every
    layer's attention pattern [batch, head_index, query_pos, key_pos] (detached, CPU)."""

    def __init__(self, adapter: Adapter, prompts: PromptSet, metric: Metric):
        store: dict = {}
        hooks = adapter.capture_hooks((Site.PATTERN,), store)
        ev = evaluate(adapter, prompts, metric, hooks, is_clean=True)
        self.values = ev.values
        self.metric = ev.metric.detach().cpu()
        self.probs = None if ev.probs is None else ev.probs.detach()
        self.patterns = [store[(Site.PATTERN, layer)].float().cpu()
                         for layer in range(adapter.n_layers)]

    def unit_pattern(self, unit: Unit) -> Float[Tensor, "batch unit_head query_pos key_pos"]:
        return self.patterns[unit.layer][:, list(unit.heads)]


