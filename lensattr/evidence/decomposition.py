"""Per-source decomposition of a head's output: out[q] = sum_s alpha[q, s] * v[s] @ W_O.

The terms sum exactly to the head's output (z @ W_O; the output bias is not per head and is
left out), which is why removing a source set S with an edge edit (alpha[q, s] = 0 for s in S,
no renormalising) equals subtracting S's terms.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..model import Adapter, Site
from ..prompts import PromptSet
from ..types import HeadId

__all__ = ["per_source_terms", "head_output"]


def _cache(adapter: Adapter, prompts: PromptSet, layer: int):
    _, store = adapter.run_with_cache(
        prompts.tokens, prompts.attention_mask, sites=(Site.PATTERN, Site.V, Site.Z)
    )
    return store[(Site.PATTERN, layer)], store[(Site.V, layer)], store[(Site.Z, layer)]


def per_source_terms(
    model, prompts: PromptSet, head
) -> Float[Tensor, "batch query_pos key_pos d_model"]:
    """alpha[q, s] * v[s] @ W_O for one head, every query and source."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    h = adapter.check_head(head)
    pattern, v, _ = _cache(adapter, prompts, h.layer)
    a = pattern[:, h.head]  # [batch, q, k]
    v_h = v[:, :, adapter.kv_head(h.head)]  # [batch, k, d_head]
    vo = v_h @ adapter.W_O(h.layer)[h.head]  # [batch, k, d_model]
    return a[..., None] * vo[:, None]  # [batch, q, k, d_model]


def head_output(model, prompts: PromptSet, head: HeadId) -> Float[Tensor, "batch pos d_model"]:
    """The head's output z @ W_O at every position (from hook_z)."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    h = adapter.check_head(head)
    _, _, z = _cache(adapter, prompts, h.layer)
    return torch.einsum("bpd,dm->bpm", z[:, :, h.head], adapter.W_O(h.layer)[h.head])
