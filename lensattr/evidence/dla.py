"""Direct logit attribution (DLA): the metric's readout split into every component's direct path.

In a pre-norm decoder the final residual at the read position is a plain sum,
``x = embed (+ pos_embed) + sum_L (sum_h z_h W_O^h + b_O^L + mlp_L + b_out^L)``, read through
the final norm and the unembedding. With the norm's scale ``s`` frozen at its clean value the
readout is linear in ``x``:

* LayerNorm ``(x - mean(x)) / s * g + beta``: component ``c`` contributes
  ``(c - mean(c)) / s . g . u``, and ``beta . u`` and ``b_U . w`` are separate terms;
* RMSNorm ``x / s * g``: component ``c`` contributes ``c / s . g . u``;

where ``u = sum_j w_j W_U[:, col_j]`` is the metric's direction in the unembedding (for
``LogitDiff``: ``W_U[:, answer] - W_U[:, wrong]``) and ``w`` its weights on the columns it
reads. Both cases are one dot product with the *readout direction*
``d = centre(g * u) / s`` (``centre`` only for LayerNorm; :func:`readout_direction`), so the
components sum to the metric's value exactly, up to float rounding; the sum is checked
against the model's own readout on every call (:class:`~lensattr.model.ModelError` when it
does not hold). The user's model is never changed: activations are captured with hooks.

Post-norm encoders (BERT, MiniLM) put a LayerNorm after every block: their final state is not
a sum of component outputs, and DLA refuses them with a ModelError rather than give a
silently wrong decomposition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.metric import Metric, MetricError, Readout
from ..core.metrics import as_metric
from ..core.prompts import PromptSet
from ..core.sites import Site
from ..core.version import __version__
from ..models.adapter import Adapter, ModelError

__all__ = ["Component", "DLA", "direct_logit_attribution", "readout_direction",
           "DLA_SITES", "ReadoutDirection"]

# what one decomposed run needs; POS_EMBED fires only on models with learned positions
DLA_SITES = (Site.EMBED, Site.POS_EMBED, Site.Z, Site.MLP_OUT, Site.V, Site.PATTERN,
             Site.LN_FINAL_SCALE)


@dataclass(frozen=True)
class Component:
    """One term of the decomposition. kind: ``embed`` / ``head`` / ``mlp`` / ``bias``;
    ``name`` says which (``embed``, ``pos_embed``, ``head``, ``mlp``, ``b_O``, ``b_out``,
    ``ln_final.b``, ``b_U``); layer and head are None where they do not apply."""

    kind: str
    name: str
    layer: int | None = None
    head: int | None = None


@dataclass
class DLA:
    """Per-component direct contributions to the metric at its read positions.

    values: ``[batch, component]``; ``components[i]`` names column i. Each row sums to the
    metric's value on that prompt (``readout``) up to ``meta["max_remainder"]``.
    direction: ``[batch, d_model]`` the readout direction through the frozen final norm.
    """

    values: Float[Tensor, "batch component"]
    components: list[Component]
    readout: Float[Tensor, " batch"]
    direction: Float[Tensor, "batch d_model"]
    meta: dict = field(default_factory=dict)

    def index(self, kind: str, name: str | None = None, layer: int | None = None,
              head: int | None = None) -> int:
        """Column of the one component matching the given fields."""
        hits = [i for i, c in enumerate(self.components)
                if c.kind == kind and (name is None or c.name == name)
                and (layer is None or c.layer == layer) and (head is None or c.head == head)]
        if len(hits) != 1:
            raise KeyError(f"component kind={kind!r} name={name!r} layer={layer} head={head}: "
                           f"{len(hits)} matches")
        return hits[0]

    def heads(self) -> Float[Tensor, "batch layer head_index"]:
        """The per-head values as ``[batch, layer, head_index]``."""
        n_layers, n_heads = self.meta["n_layers"], self.meta["n_heads"]
        cols = [self.index("head", layer=layer, head=h)
                for layer in range(n_layers) for h in range(n_heads)]
        return self.values[:, cols].reshape(-1, n_layers, n_heads)

    def to_frame(self) -> pd.DataFrame:
        """One row per component: kind, name, layer, head (NaN where not applicable), the
        mean over prompts and one ``p<i>`` column per prompt."""
        rows = []
        for i, c in enumerate(self.components):
            row = {"kind": c.kind, "name": c.name,
                   "layer": float("nan") if c.layer is None else c.layer,
                   "head": float("nan") if c.head is None else c.head,
                   "value": float(self.values[:, i].mean())}
            row.update({f"p{b}": float(v) for b, v in enumerate(self.values[:, i])})
            rows.append(row)
        return pd.DataFrame(rows)


@dataclass(frozen=True)
class ReadoutDirection:
    """The metric as a linear function of the final residual at the read positions, with the
    final norm's scale frozen: ``metric = x . direction + sum(offsets)``.

    direction ``[batch, d_model]``; offsets: name -> ``[batch]`` (``ln_final.b``, ``b_U``)."""

    direction: Float[Tensor, "batch d_model"]
    offsets: dict[str, Tensor]
    positions: Tensor  # [batch] read positions


def linear_weights(metric: Metric, prompts: PromptSet, readout: Readout) -> Tensor:
    """The metric's weights ``[batch, k]`` on the logit columns it reads; refuses a metric that
    is not linear in them (checked on random values) or that reads more than columns."""
    if readout.kind != "columns":
        raise MetricError(
            f"metric {metric.name!r}: direct logit attribution needs a metric linear in a few "
            "logit columns at one position (e.g. LogitDiff); this one reads "
            f"{readout.kind!r}"
        )
    n, k = cast(Tensor, readout.columns).shape  # a "columns" readout names its columns
    zero = torch.zeros(n, k)
    base = metric.compute(zero, prompts, None).float()
    w = torch.stack([metric.compute(zero + torch.eye(k)[j], prompts, None).float() - base
                     for j in range(k)], 1)  # [batch, k]
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 10
    ok = torch.allclose(metric.compute(x, prompts, None).float(), (x * w).sum(1), atol=1e-4)
    if base.abs().max() > 1e-6 or not ok:
        raise MetricError(f"metric {metric.name!r}: not linear in the logit columns it reads; "
                          "direct logit attribution needs a linear metric (e.g. LogitDiff)")
    return w


def readout_direction(adapter: Adapter, scale: Tensor, readout: Readout, weights: Tensor
                      ) -> ReadoutDirection:
    """The readout direction ``[batch, d_model]`` through the final norm with ``scale``
    (``[batch, pos, 1]``, from ``Site.LN_FINAL_SCALE``) frozen, and the constant terms."""
    norm = adapter.final_norm()
    W_U, b_U = adapter.unembed()  # [d_model, d_vocab], [d_vocab]
    dev = W_U.device
    # a "columns" readout (the one linear_weights admits): its columns and positions are set
    cols = cast(Tensor, readout.columns).to(dev)
    w = weights.to(dev, W_U.dtype)  # [batch, k]
    pos = cast(Tensor, readout.positions).to(dev)
    u = torch.einsum("dbk,bk->bd", W_U[:, cols], w)  # [batch, d_model]
    g = u * norm.weight  # [batch, d_model]
    if norm.kind == "layernorm":  # (c - mean c) . g == c . (g - mean g)
        g = g - g.mean(-1, keepdim=True)
    rows = torch.arange(len(pos), device=dev)
    s = scale.to(dev)[rows, pos]  # [batch, 1]
    offsets = {}
    if norm.bias is not None:
        offsets["ln_final.b"] = u @ norm.bias  # [batch]
    if b_U is not None:
        offsets["b_U"] = (b_U[cols] * w).sum(1)  # [batch]
    return ReadoutDirection(g / s, offsets, pos)


def check_direct_path(adapter: Adapter) -> None:
    if not adapter.has_direct_path:
        raise ModelError(
            f"model {adapter.name!r}: direct logit attribution needs a pre-norm decoder; this "
            "is a post-norm encoder (BERT-style: a LayerNorm after every block), whose final "
            "state is not the sum of the components' outputs, so no exact per-component "
            "decomposition exists"
        )
    if not adapter.logits_meaningful:
        raise ModelError(f"model {adapter.name!r} has no trained output head: its logits, "
                         "and so their attribution, mean nothing")


def capture(adapter: Adapter, prompts: PromptSet, readout: Readout, hooks=None
            ) -> tuple[Tensor, dict]:
    """One run: the readout values and every activation DLA needs (after ``hooks``)."""
    store: dict = {}
    all_hooks = adapter.capture_hooks(DLA_SITES, store, hooks)
    values = adapter.read(prompts.tokens, prompts.attention_mask, readout, all_hooks)
    return values, store


def decompose(adapter: Adapter, store: dict, rd: ReadoutDirection
              ) -> tuple[Tensor, list[Component]]:
    """``[batch, component]`` direct contributions along ``rd`` from one captured run."""
    d, pos = rd.direction, rd.positions  # [batch, d_model], [batch]
    dev = d.device
    rows = torch.arange(len(pos), device=dev)

    def at(x: Tensor) -> Tensor:  # [batch, pos, ...] -> [batch, ...] at the read position
        return x.to(dev)[rows, pos]

    def dot(vec: Tensor) -> Tensor:  # [batch, d_model] or [d_model] -> [batch]
        return (vec.to(d.dtype) * d).sum(-1)

    cols, comps = [], []

    def add(value: Tensor, comp: Component) -> None:
        cols.append(value)
        comps.append(comp)

    add(dot(at(store[(Site.EMBED, None)])), Component("embed", "embed"))
    if (Site.POS_EMBED, None) in store:
        add(dot(at(store[(Site.POS_EMBED, None)])), Component("embed", "pos_embed"))
    for layer in range(adapter.n_layers):
        z = at(store[(Site.Z, layer)])  # [batch, head, d_head]
        W_O = adapter.W_O(layer).to(dev, d.dtype)  # [head, d_head, d_model]
        heads = torch.einsum("bhe,hem,bm->bh", z.to(d.dtype), W_O, d)  # [batch, head]
        for h in range(adapter.n_heads):
            add(heads[:, h], Component("head", "head", layer, h))
        b_O = adapter.b_O(layer)
        if b_O is not None:
            add(dot(b_O.to(dev)).expand(len(pos)), Component("bias", "b_O", layer))
        mlp = at(store[(Site.MLP_OUT, layer)])  # [batch, d_model], includes its bias
        b_out = adapter.mlp_b_out(layer)
        if b_out is not None:
            mlp = mlp - b_out.to(dev, mlp.dtype)
        add(dot(mlp), Component("mlp", "mlp", layer))
        if b_out is not None:
            add(dot(b_out.to(dev)).expand(len(pos)), Component("bias", "b_out", layer))
    for name, off in rd.offsets.items():
        add(off.to(dev, d.dtype), Component("bias", name))
    return torch.stack(cols, 1), comps


def direct_logit_attribution(model, prompts: PromptSet, metric) -> DLA:
    """Direct logit attribution of every head, MLP, embedding and bias at the metric's read
    positions, with the final norm's scale frozen from this (clean) run.

    Returns a :class:`DLA`: ``values [batch, component]`` summing to the metric per prompt."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    metric = as_metric(metric)
    check_direct_path(adapter)
    readout = metric.readout(prompts)
    weights = linear_weights(metric, prompts, readout)
    raw, store = capture(adapter, prompts, readout)
    actual = metric.compute(raw.float(), prompts, None).float().cpu()  # [batch]
    rd = readout_direction(adapter, store[(Site.LN_FINAL_SCALE, None)], readout, weights)
    values, comps = decompose(adapter, store, rd)
    values = values.float().cpu()
    remainder = check_sum(adapter, values, actual)
    meta = {
        "method": "direct_logit_attribution",
        "model": adapter.name,
        "metric": metric.describe(),
        "n_prompts": len(prompts),
        "n_layers": adapter.n_layers,
        "n_heads": adapter.n_heads,
        "final_norm": adapter.final_norm().kind,
        "frozen_scale": "clean run",
        "max_remainder": remainder,
        "lensattr_version": __version__,
    }
    return DLA(values, comps, actual, rd.direction.float().cpu(), meta)


def check_sum(adapter: Adapter, values: Tensor, actual: Tensor) -> float:
    """Max |metric - sum of components|; a ModelError when the sum does not hold (a model whose
    residual is not the sum this module assumes), never a silently wrong decomposition."""
    gap = (actual - values.sum(1)).abs()
    if (gap > 1e-3 * actual.abs().clamp(min=1.0)).any():
        raise ModelError(
            f"model {adapter.name!r}: the direct-path components sum to {values.sum(1).tolist()}"
            f" but the metric is {actual.tolist()}; its final residual is not the sum of "
            "embeddings, heads, biases and MLPs read through one final norm"
        )
    return float(gap.max())
