"""Attention flow (Abnar & Zuidema 2020): the exact maximum flow from input token s to output
token q through the layered graph of the mixed attention matrices.

Nodes are positions x (layers + 1); layer l's matrix ``A~_l`` (see
:mod:`lensattr.claims.rollout`, residual included) gives an edge from (l-1, k) to (l, q) with
capacity ``A~_l[q, k]``. ``flow[b, q, s]`` is the max-flow value from (0, s) to (L, q), solved
exactly (push-relabel on float capacities) by igraph's compiled solver, one solve per pair.
In a causal model only positions <= q can reach q, so each output token's solves run on that
smaller graph (the same max flow: the other nodes lie on no path to q).

igraph is an optional dependency (``pip install "lensattr[flow]"``): only flow needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.prompts import PromptSet
from ..models.adapter import Adapter
from .inputs import token_inputs
from .rollout import layer_matrices

__all__ = ["Flow", "attention_flow", "flow", "BYTES_PER_EDGE", "FlowBudgetError"]

BYTES_PER_EDGE = 64  # igraph: edge list, incidence indices, capacity and solver state (approx.)
DEFAULT_BUDGET_MB = 1024


class FlowBudgetError(ValueError):
    """The layered graph of one prompt does not fit the memory budget."""


def _igraph():
    try:
        import igraph
    except ImportError:
        raise ImportError(
            "attention flow needs python-igraph (a compiled max-flow solver): "
            'pip install "lensattr[flow]"  (or: pip install igraph)'
        ) from None
    return igraph


@dataclass
class Flow:
    """``values[b, q, s]``: max flow from input token s to output token q (NaN where not
    computed: padded tokens, sources after the query in a causal model, unrequested rows)."""

    values: Float[Tensor, "batch query_pos key_pos"]
    meta: dict = field(default_factory=dict)

    def normalised(self) -> Tensor:
        """Rows divided by their sums over the computed sources."""
        s = torch.nansum(self.values, -1, keepdim=True)
        return torch.where(s > 0, self.values / s.clamp(min=1e-30), torch.nan)

    def to_frame(self) -> pd.DataFrame:
        """One row per computed (prompt, output token, input token)."""
        b, q, k = self.values.shape
        idx = torch.cartesian_prod(torch.arange(b), torch.arange(q), torch.arange(k))
        v = self.values.reshape(-1)
        keep = ~torch.isnan(v)
        idx = idx[keep]
        return pd.DataFrame({"prompt": idx[:, 0].numpy(), "query_pos": idx[:, 1].numpy(),
                             "key_pos": idx[:, 2].numpy(), "flow": v[keep].numpy()})


def _edges(mixed: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Edge list and capacities of the layered graph of ``mixed`` [L, n, n] (first n
    positions). Node id of (layer l, position p) is l * n + p."""
    L = mixed.shape[0]
    m = mixed[:, :n, :n]
    lay, q, k = np.nonzero(m > 0)
    src = lay * n + k  # (l, k) in layer numbering 0..L-1 is node layer l
    dst = (lay + 1) * n + q
    return np.stack([src, dst], 1), m[lay, q, k].astype(np.float64), L


def attention_flow(
    mixed: Float[Tensor, "batch layer query_pos key_pos"],
    attention_mask: Tensor | None = None,
    causal: bool = True,
    queries: Tensor | None = None,
    memory_budget_mb: float = DEFAULT_BUDGET_MB,
    meta: dict | None = None,
) -> Flow:
    """Exact attention flow for every (output token, input token) pair of every prompt.

    ``mixed``: per-layer matrices with the residual in (from :func:`~.rollout.mix_residual`
    or :func:`~.rollout.layer_matrices`). ``queries`` ([batch, pos] bool): output tokens to
    solve (default every real one). A prompt whose graph needs more than
    ``memory_budget_mb`` raises :class:`FlowBudgetError` naming the budget.
    """
    ig = _igraph()
    b, L, p, _ = mixed.shape
    valid = (torch.ones(b, p, dtype=torch.bool) if attention_mask is None
             else attention_mask.bool().cpu())
    want = valid if queries is None else valid & queries.bool().cpu()
    if causal:  # an encoder's matrices handed in as a decoder's would be mis-pruned
        pair = valid[:, :, None] & valid[:, None, :]
        future = (mixed.detach().cpu() > 0) & torch.ones(p, p, dtype=torch.bool).triu(1)
        if (future & pair[:, None]).any():
            raise ValueError(
                "attention_flow: causal=True but some query attends a later token (an "
                "encoder's attention?); pass causal=False for encoders"
            )
    out = torch.full((b, p, p), torch.nan, dtype=torch.float64)
    arr = mixed.detach().double().cpu().numpy()
    for bi in range(b):
        pos = torch.nonzero(valid[bi]).flatten().numpy()  # real positions (padding anywhere)
        n = len(pos)
        n_edges = L * (n * (n + 1) // 2 if causal else n * n)
        need_mb = n_edges * BYTES_PER_EDGE / 2**20
        if need_mb > memory_budget_mb:
            raise FlowBudgetError(
                f"attention_flow: prompt {bi} has {n} tokens x {L} layers = {n_edges:,} edges, "
                f"about {need_mb:,.0f} MB, over memory_budget_mb={memory_budget_mb:g}; raise "
                "memory_budget_mb, shorten the prompt, or use rollout"
            )
        m = arr[bi][:, pos][:, :, pos]  # [L, n, n] over the real tokens
        full = None if causal else _graph(ig, m, n)
        for qi in np.nonzero(want[bi, pos].numpy())[0]:
            size = qi + 1 if causal else n
            g = _graph(ig, m, size) if full is None else full  # full is None iff causal
            sink = L * size + qi
            for si in range(size):
                out[bi, pos[qi], pos[si]] = g.maxflow_value(si, sink, capacity="capacity")
    return Flow(values=out, meta=dict(meta or {}, causal=causal))


def _graph(ig, m: np.ndarray, n: int):
    edges, caps, L = _edges(m, n)
    g = ig.Graph(n=(L + 1) * n, edges=edges.tolist(), directed=True)
    g.es["capacity"] = caps.tolist()
    return g


def flow(
    model,
    tokens: Tensor | PromptSet,
    attention_mask: Tensor | None = None,
    weights: str = "half",
    residual: float = 0.5,
    queries: Tensor | None = None,
    memory_budget_mb: float = DEFAULT_BUDGET_MB,
) -> Flow:
    """Attention flow of ``model`` on ``tokens`` (token ids ``[batch, pos]``, or a
    :class:`~lensattr.core.prompts.PromptSet` with its mask): one forward pass, then the
    solves."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    tokens, attention_mask = token_inputs(tokens, attention_mask)
    mixed = layer_matrices(adapter, tokens, attention_mask, weights, residual)
    return attention_flow(mixed, attention_mask, adapter.is_causal, queries, memory_budget_mb,
                          meta={"model": adapter.name, "method": "flow", "weights": weights,
                                "residual": residual if weights == "half" else "measured"})
