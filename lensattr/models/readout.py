"""Reading a model's output: only what a metric's readout asks for (the final hidden states,
a few unembedding columns, the logits at the read positions, or all logits), with or without
autograd, stopping the forward pass early where the rest is not needed."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..core.sites import Site
from .errors import ModelError
from .hooks import Hooks, StopForward, after

if TYPE_CHECKING:
    from .adapter import Adapter

__all__ = ["read", "read_final", "read_grad", "capture", "cache", "fast_readout_ok"]



def read(
    a: Adapter,
    tokens: Tensor,
    attention_mask: Tensor | None,
    readout,
    hooks: Hooks | None = None,
) -> Tensor:
    """Compute only what a metric's :class:`~lensattr.metrics.Readout` asks for.

    ``hidden``: the final hidden states [batch, pos, d_model] (output of the last block;
    the forward stops there). ``columns``: the final residual is captured before the final
    norm and the forward stops there; the norm is applied at the read positions only and
    just the requested unembedding columns are computed ([batch, k]). ``logits``: the full
    vocabulary at the read positions ([batch, d_vocab]). ``all_logits``: the ordinary
    forward. Falls back to the ordinary forward when this model's unembedding is not the
    plain ``ln_final -> W_U`` (checked once against a full forward).
    """
    if readout.kind == "hidden":
        return capture(a, tokens, attention_mask, hooks, (Site.BLOCK_OUT, a.n_layers - 1))
    if not a.logits_meaningful:
        raise ModelError(
            f"metric: model {a.name!r} has no trained output head (its logits mean "
            "nothing); use a metric that reads the final hidden states, e.g. "
            "lensattr.core.metrics.PairCosine or HiddenCosineToClean"
        )
    if readout.kind == "all_logits" or not fast_readout_ok(a, tokens, attention_mask):
        logits = a.forward(tokens, attention_mask, hooks)
        if readout.kind == "all_logits":
            return logits
        rows = torch.arange(logits.shape[0], device=logits.device)
        at = logits[rows, readout.positions.to(logits.device)]  # [batch, d_vocab]
        if readout.kind == "columns":
            return at.gather(1, readout.columns.to(at.device))
        return at
    resid = capture(a, tokens, attention_mask, hooks, (Site.RESID_FINAL, None))
    # the residual's own hooks already ran during the capture
    return read_final(a, resid, readout, hooks)


def read_final(a: Adapter, resid: Tensor, readout, hooks=None, first_pos: int = 0,
               grad: bool = False) -> Tensor:
    """The final norm and the unembedding columns (or rows) a ``columns`` / ``logits``
    readout asks for, from the final residual ``resid`` [batch, pos, d_model] of positions
    ``first_pos`` onwards. The caller's hooks on the norm itself (e.g. a frozen scale) run.
    ``grad``: keep autograd on (gradient-based attribution)."""
    norm_hooks = {k: f for k, f in (hooks or {}).items()
                  if k[0] in (Site.LN_FINAL_SCALE, Site.LN_FINAL_OUT)}
    rows = torch.arange(resid.shape[0], device=resid.device)
    no_grad = contextlib.nullcontext() if grad else torch.no_grad()
    with no_grad, a.hooks(norm_hooks):
        normed = a.model.ln_final(resid)  # [batch, pos, d_model]; cheap next to W_U
        at = readout.positions.to(resid.device) - first_pos
        normed = normed[rows, at]  # [batch, d_model]
        W_U, b_U = a.model.W_U, a.model.b_U  # [d_model, d_vocab], [d_vocab]
        if readout.kind == "columns":
            cols = readout.columns.to(resid.device)  # [batch, k]
            w = W_U.T[cols]  # [batch, k, d_model]
            return torch.einsum("bkd,bd->bk", w, normed) + b_U[cols]
        return normed @ W_U + b_U


def read_grad(
    a: Adapter,
    tokens: Tensor,
    attention_mask: Tensor | None,
    readout,
    hooks: Hooks | None = None,
) -> Tensor:
    """:func:`read` with autograd on, for gradient-based attribution: the same readout
    (final hidden states, the read unembedding columns or rows, or all logits), connected
    to the graph of every hooked activation."""
    kw = {} if attention_mask is None else {"attention_mask": attention_mask.to(a.device)}
    key: tuple[Site, int | None] | None
    if readout.kind == "hidden":
        key = (Site.BLOCK_OUT, a.n_layers - 1)
    elif readout.kind != "all_logits" and fast_readout_ok(a, tokens, attention_mask):
        key = (Site.RESID_FINAL, None)
    else:
        key = None
    store: dict[str, Any] = {}
    all_hooks = dict(hooks or {})
    if key is not None:

        def grab(x):
            store["x"] = x
            raise StopForward

        all_hooks[key] = after(all_hooks.get(key), grab)
    with torch.enable_grad(), a.hooks(all_hooks):
        try:
            store["logits"] = a.model(tokens.to(a.device), **kw)
        except StopForward:
            pass
        if key is None:
            logits = store["logits"]
            if readout.kind == "all_logits":
                return logits
            rows = torch.arange(logits.shape[0], device=logits.device)
            at = logits[rows, readout.positions.to(logits.device)]  # [batch, d_vocab]
            return at.gather(1, readout.columns.to(at.device)) if (
                readout.kind == "columns") else at
        if readout.kind == "hidden":
            return store["x"]
    return read_final(a, store["x"], readout, hooks, grad=True)


def capture(a: Adapter, tokens: Tensor, attention_mask: Tensor | None, hooks: Hooks | None,
            key: tuple[Site, int | None]) -> Tensor:
    """Run until the hook at ``key`` fires (after any hook already there), return its
    value and stop the forward pass."""
    store: dict[str, Tensor] = {}
    all_hooks = dict(hooks or {})

    def grab(x):
        store["x"] = x.detach()
        raise StopForward

    all_hooks[key] = after(all_hooks.get(key), grab)
    try:
        a.forward(tokens, attention_mask, all_hooks)
    except StopForward:
        pass
    return store["x"]


_BEYOND_BLOCKS = (Site.RESID_FINAL, Site.LN_FINAL_SCALE, Site.LN_FINAL_OUT)


def cache(a: Adapter, tokens: Tensor, attention_mask: Tensor | None, sites, hooks: Hooks | None
          ) -> dict:
    """``sites`` captured (``Adapter.capture_hooks``), the forward stopped after the last
    block's output when no site needs the final norm or the unembedding."""
    store: dict = {}
    all_hooks = a.capture_hooks(tuple(sites), store, hooks)
    if any(s in _BEYOND_BLOCKS for s in sites):
        a.forward(tokens, attention_mask, all_hooks)
    else:  # run until the last block's output, after the capture hooks there
        capture(a, tokens, attention_mask, all_hooks, (Site.BLOCK_OUT, a.n_layers - 1))
    return store


def fast_readout_ok(a: Adapter, tokens: Tensor, attention_mask: Tensor | None) -> bool:
    """Is the unembedding the plain ``ln_final -> W_U`` (checked once per set of weights
    against a full forward)?"""
    store = a._probe_store()
    if "fast_readout" not in store:
        t = tokens[:1]
        m = None if attention_mask is None else attention_mask[:1]
        full = a.forward(t, m)[0]  # [pos, d_vocab]
        try:
            resid = capture(a, t, m, None, (Site.RESID_FINAL, None))
            with torch.no_grad():
                fast = a.model.ln_final(resid) @ a.model.W_U + a.model.b_U
            ok = bool(torch.allclose(fast[0], full, atol=1e-4, rtol=1e-4))
        except Exception:  # no ln_final / W_U of the plain kind
            ok = False
        store["fast_readout"] = ok
    return store["fast_readout"]

