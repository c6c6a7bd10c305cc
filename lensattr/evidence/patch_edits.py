"""The edits a patching forward applies: take source activations where a mask is set, and
record a watched head's attention row. Each is ``f(x, p0)`` for rows of query positions
``p0..`` (the hook-free forward runs only those; the bridge passes ``p0 = 0``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.sites import Site

__all__ = ["edit", "watch_row"]


def edit(site: Site, mask: Tensor, src: Tensor):
    """An edit ``f(x, p0)`` that takes ``src`` where ``mask`` is set, for rows of query positions
    ``p0..`` (the hook-free forward runs only those; the bridge passes ``p0 = 0``)."""
    if site == Site.RESID_FINAL:  # src is an additive change [rows, pos, d_model]
        def add(x, p0):
            return x + src[:, p0: p0 + x.shape[1]].to(x.dtype)
        return add
    if site == Site.PATTERN:
        def pattern(x, p0):  # [rows, head, q, key]
            nq, nk = x.shape[2], x.shape[3]
            m = mask[:, :, p0: p0 + nq, :nk]
            return torch.where(m, src[:, :, p0: p0 + nq, :nk].to(x.dtype), x)
        return pattern

    def vector(x, p0):  # [rows, pos, head, d_head]
        nq = x.shape[1]
        return torch.where(mask[:, p0: p0 + nq, :, None], src[:, p0: p0 + nq].to(x.dtype), x)
    return vector


def watch_row(inner, heads: Tensor, read: Tensor, out: Tensor):
    """A pattern hook that records each row's head ``heads[r]`` attention at its read position
    into ``out`` [rows, key_pos] after any edit ``inner``."""
    def f(x, p0):
        if inner is not None:
            x = inner(x, p0)
        r = torch.arange(x.shape[0], device=x.device)
        out[:, : x.shape[3]] = x[r, heads, read - p0].float()
        return x
    return f
