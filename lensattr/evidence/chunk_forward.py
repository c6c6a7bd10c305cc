"""The forward pass of one chunk of the batched engine.

A mixin of :class:`lensattr.evidence.engine.Engine`: row ``r = k * n_prompts + i`` of the
chunk is intervention ``k`` on prompt ``i``. Per edited layer the interventions' masks are
assembled on the CPU (many small writes, :func:`layer_masks`) and moved to the model's device
once; the hooks (:mod:`.hooks`) edit only their own rows. The chunk runs on the hook-free
forward from the first edited layer and position where it can (see :mod:`.bare`), else on the
bridge; its metric values return on the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..core.sites import Site
from ..core.types import AblationMethod
from .bare import BARE_SITES
from .chunk_plan import ChunkPlan
from .hooks import METHOD_CODE, HookBuilders, pattern_hook
from .metric_rows import metric_rows

if TYPE_CHECKING:
    from ..core.metric import Metric
    from ..core.prompts import PromptSet
    from ..models.adapter import Hooks
    from ..models.hooks import HookFn
    from .interventions import Intervention

__all__ = ["ChunkForward", "layer_masks"]

_CPU = torch.device("cpu")
# a layer's edge edits: remove [rows, head, q, k], baseline code and weights_only [rows, head]
EdgeMasks = tuple[Tensor, Tensor, Tensor]


def layer_masks(ivs: list[Intervention], layer: int, n: int, p: int, n_heads: int
                ) -> tuple[Tensor, Tensor, EdgeMasks | None]:
    """The edits of ``layer`` by the chunk's interventions (``n`` prompts each, ``p``
    positions), on the CPU: ablation codes [rows, pos, head] (0: none, else
    :data:`.hooks.METHOD_CODE`), renormalise [rows, head], and the edge masks (None when no
    intervention edits an edge of this layer)."""
    R = len(ivs) * n
    codes = torch.zeros(R, p, n_heads, dtype=torch.long, device=_CPU)  # [rows, pos, head]
    remove = base = wonly = None
    renorm = torch.zeros(R, n_heads, dtype=torch.bool, device=_CPU)
    for k, iv in enumerate(ivs):
        rows = slice(k * n, (k + 1) * n)
        for ab in iv.ablations:
            if ab.head.layer == layer:
                at = (torch.ones(n, p, dtype=torch.bool, device=_CPU) if ab.rows is None
                      else ab.rows.cpu())
                c = codes[rows, :, ab.head.head]
                c[at] = METHOD_CODE[ab.method]
        for e in iv.edges:
            if e.head.layer == layer:
                if remove is None or base is None or wonly is None:  # all three, or none
                    remove = torch.zeros(R, n_heads, p, p, dtype=torch.bool, device=_CPU)
                    base = torch.zeros(R, n_heads, dtype=torch.long, device=_CPU)
                    wonly = torch.zeros(R, n_heads, dtype=torch.bool, device=_CPU)
                remove[rows, e.head.head] |= e.remove.cpu()
                wonly[rows, e.head.head] |= e.weights_only
                renorm[rows, e.head.head] |= e.renormalise
                if e.baseline != AblationMethod.ZERO:
                    if (base[rows, e.head.head] > 0).any():
                        raise ValueError(
                            f"interventions: {iv.label!r} edits head {e.head} twice "
                            "with a replacement baseline; merge the masks into one edit"
                        )
                    base[rows, e.head.head] = METHOD_CODE[e.baseline]
    if remove is None or base is None or wonly is None:
        return codes, renorm, None
    if bool((wonly & renorm).any()):
        raise ValueError(
            f"interventions: an intervention of layer {layer} both renormalises a "
            "head's rows and replaces its weights (weights_only); use separate "
            "interventions")
    return codes, renorm, (remove, base, wonly)


class ChunkForward(ChunkPlan, HookBuilders):
    # the engine's state these methods read or count in (set by Engine.__init__)
    metric: Metric
    clean_values: Tensor
    _editable: bool
    n_rows: dict[str, int]
    work: float

    def _metric(self, values: Tensor, prompts: PromptSet, clean: Tensor | None,
                invalid: Tensor | None = None) -> Tensor:
        """The metric per row (on the CPU), after checking the readout: see
        :func:`.metric_rows.metric_rows`."""
        return metric_rows(self.metric, values, prompts, clean, invalid)

    def _run_chunk(self, ivs: list[Intervention], track: bool) -> tuple[Tensor, Tensor | None]:
        """One forward pass for ``ivs``: metric values [intervention, batch] and, when
        ``track``, head deltas [intervention, layer, head], averaged over the prompts (see the
        module docstring)."""
        a, n, dev = self.adapter, len(self.prompts), self.device
        idx = torch.arange(n, device=_CPU).repeat(len(ivs))  # row r -> prompt r % n
        R = idx.shape[0]
        hooks: Hooks = {}
        invalid = torch.zeros(R, dtype=torch.bool, device=dev)
        layers: set[int] = set().union(*(iv.layers() for iv in ivs))
        for layer in sorted(layers):
            self._layer_hooks(ivs, layer, idx, invalid, hooks)
        if any(iv.direct for iv in ivs):
            self._direct_hooks(ivs, idx, hooks)
        deltas = None
        if track:
            deltas = torch.zeros(R, a.n_layers, a.n_heads, device=dev)
            pos = self._read_pos(self.readout)[idx]
            for layer in range(a.n_layers):
                inner = hooks.get((Site.Z, layer))
                hooks[(Site.Z, layer)] = self._track_hook(layer, inner, idx, pos, deltas)
        prompts = self.prompts.take(idx)
        if self._bare is not None and {k[0] for k in hooks} <= BARE_SITES:
            reach = [self._reach(iv) for iv in ivs]
            layer, first = min(r[0] for r in reach), min(r[1] for r in reach)
            vals = self._bare.run(idx, layer, first, hooks, self.readout.take(idx))
            self.n_rows["bare"] += R
            self.work += R * self._bare.work(layer, first)
        else:
            vals = a.read(prompts.tokens, prompts.attention_mask, self.readout.take(idx), hooks)
            self.n_rows["bridge"] += R
            self.work += R
        out = self._metric(vals, prompts, self.clean_values[idx], invalid)
        d = (None if deltas is None else
             deltas.reshape(len(ivs), n, a.n_layers, a.n_heads).mean(1).cpu())
        return out.reshape(len(ivs), n), d

    def _layer_hooks(self, ivs: list[Intervention], layer: int, idx: Tensor, invalid: Tensor,
                     hooks: Hooks) -> None:
        """Add the hooks of ``layer``'s edits to ``hooks``: the pattern hook of edge edits (on
        models whose hook_pattern edits count) and the z hook of ablations and the rest."""
        dev = self.device
        codes, renorm, edges = layer_masks(ivs, layer, len(self.prompts), self.prompts.n_pos,
                                           self.adapter.n_heads)
        codes, renorm = codes.to(dev), renorm.to(dev)
        edge_z = None
        if edges is not None:
            remove, base, wonly = (t.to(dev) for t in edges)
            edge_z = self._edge_hooks(layer, remove, base, wonly, renorm, invalid, idx, hooks)
        if (codes > 0).any() or edge_z is not None:
            hooks[(Site.Z, layer)] = self._z_hook(layer, codes, idx, edge_z)

    def _edge_hooks(self, layer: int, remove: Tensor, base: Tensor, wonly: Tensor,
                    renorm: Tensor, invalid: Tensor, idx: Tensor, hooks: Hooks
                    ) -> HookFn | None:
        """The edge edits of ``layer``: the pattern hook goes into ``hooks``; returns the
        edit of z that goes with them (through hook_z where attention is delegated to HF,
        replacement baselines, the value bias), or None."""
        weights = self._weight_terms(layer, remove, base, wonly, idx)
        biased = bool(self._value_bias(layer).any())  # b_V kept out of edits
        counted = remove & ~wonly[:, :, None, None] & ~renorm[:, :, None, None]
        stash: dict | None = {} if biased and self._editable else None
        edge_z = None
        if self._editable:
            hooks[(Site.PATTERN, layer)] = pattern_hook(remove, renorm, invalid, weights,
                                                        stash, counted)
        else:  # attention delegated to HF: edit the head outputs instead (exact)
            edge_z = self._edge_z_hook(layer, remove, renorm, invalid, idx, weights)
        if (base > 0).any():
            edge_z = self._edge_baseline_hook(layer, remove & ~wonly[:, :, None, None],
                                              base, idx, edge_z)
        if biased:
            edge_z = self._bias_hook(layer, counted, base, idx, stash, edge_z)
        return edge_z
