"""Attention rollout (Abnar & Zuidema 2020), batched in torch, for decoders and encoders.

Each layer's mixing matrix is the head-averaged attention with the residual added,
``A~_l = r I + (1 - r) A_l`` rows renormalised (the paper's r = 0.5), or, with
``weights="norms"``, the residual-aware norm matrix of Kobayashi et al. 2021 (see
:mod:`lensattr.claims.norms`: the residual's and every source's share measured as norms)
normalised per row. Rollout multiplies them: ``R_1 = A~_1``, ``R_l = A~_l R_{l-1}``;
``R_L[q, s]`` is how much output token q draws on input token s. Padded positions are
mixed by the identity, so they neither give nor take anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.prompts import PromptSet
from ..core.sites import Site
from ..models.adapter import Adapter
from .inputs import token_inputs

__all__ = ["Rollout", "mix_residual", "attention_rollout", "layer_matrices", "head_averaged",
           "WEIGHTS"]

WEIGHTS = ("half", "norms")


def mix_residual(
    attn: Float[Tensor, "batch layer query_pos key_pos"],
    residual: float = 0.5,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, "batch layer query_pos key_pos"]:
    """``r I + (1 - r) A`` with rows renormalised; padded query rows become identity rows and
    padded key columns zero."""
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual: expected a weight in [0, 1], got {residual}")
    n = attn.shape[-1]
    eye = torch.eye(n, dtype=attn.dtype)
    mixed = residual * eye + (1 - residual) * attn
    return _normalise_rows(mixed, attention_mask)


def _normalise_rows(m: Tensor, attention_mask: Tensor | None) -> Tensor:
    n = m.shape[-1]
    eye = torch.eye(n, dtype=m.dtype)
    if attention_mask is not None:
        valid = attention_mask.bool().cpu()  # [batch, pos]
        pair = (valid[:, :, None] & valid[:, None, :])[:, None]  # [b, 1, q, k]
        m = torch.where(pair, m, 0.0)
        m = torch.where(valid[:, None, :, None], m, eye)  # padded query rows: identity
    s = m.sum(-1, keepdim=True)
    return torch.where(s > 0, m / s.clamp(min=1e-30), 0.0)


@dataclass
class Rollout:
    """``joint[b, l, q, s]``: rollout up to and including layer l (``final`` = last layer)."""

    joint: Float[Tensor, "batch layer query_pos key_pos"]
    mixed: Float[Tensor, "batch layer query_pos key_pos"]  # the per-layer matrices used
    meta: dict = field(default_factory=dict)

    @property
    def final(self) -> Float[Tensor, "batch query_pos key_pos"]:
        return self.joint[:, -1]

    def to_frame(self) -> pd.DataFrame:
        """One row per (prompt, output token, input token) of the final rollout."""
        b, q, k = self.final.shape
        idx = torch.cartesian_prod(torch.arange(b), torch.arange(q), torch.arange(k))
        return pd.DataFrame({"prompt": idx[:, 0].numpy(), "query_pos": idx[:, 1].numpy(),
                             "key_pos": idx[:, 2].numpy(),
                             "rollout": self.final.reshape(-1).numpy()})


def head_averaged(model, cache) -> Float[Tensor, "batch layer query_pos key_pos"]:
    """Head-averaged attention per layer from a bridge ``ActivationCache`` (or a dict with
    the same keys), ready for :func:`mix_residual`."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    return torch.stack([p.double().mean(1) for p in adapter.patterns_from_cache(cache)], 1)


def attention_rollout(
    mixed: Float[Tensor, "batch layer query_pos key_pos"], meta: dict | None = None
) -> Rollout:
    """Rollout of already-mixed per-layer matrices (from :func:`mix_residual` or
    :func:`layer_matrices`), in float64."""
    m = mixed.double()
    joint = [m[:, 0]]
    for li in range(1, m.shape[1]):
        joint.append(m[:, li] @ joint[-1])  # [b, q, k] @ [b, k, s]
    return Rollout(joint=torch.stack(joint, 1), mixed=m, meta=dict(meta or {}))


def layer_matrices(
    model,
    tokens: Tensor,
    attention_mask: Tensor | None = None,
    weights: str = "half",
    residual: float = 0.5,
) -> Float[Tensor, "batch layer query_pos key_pos"]:
    """The mixed per-layer matrices of ``model`` on ``tokens``: ``weights="half"`` the
    head-averaged pattern mixed with the residual (weight ``residual``), ``"norms"`` the
    row-normalised Kobayashi 2021 norms (residual weight measured, ``residual`` unused)."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    if weights == "half":
        st = adapter.cache(tokens, attention_mask, sites=(Site.PATTERN,))
        attn = torch.stack([st[(Site.PATTERN, li)].detach().cpu().double().mean(1)
                            for li in range(adapter.n_layers)], 1)  # [b, L, q, k]
        return mix_residual(attn, residual, attention_mask)
    if weights == "norms":
        from .norms import norm_attention

        return _normalise_rows(
            norm_attention(adapter, tokens, attention_mask).residual.double(), attention_mask
        )
    raise ValueError(f"weights: expected one of {WEIGHTS}, got {weights!r}")


def rollout(model, tokens: Tensor | PromptSet, attention_mask: Tensor | None = None,
            weights: str = "half", residual: float = 0.5) -> Rollout:
    """Attention rollout of ``model`` on ``tokens`` (token ids ``[batch, pos]``, or a
    :class:`~lensattr.core.prompts.PromptSet` with its mask); one forward pass."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    tokens, attention_mask = token_inputs(tokens, attention_mask)
    mixed = layer_matrices(adapter, tokens, attention_mask, weights, residual)
    return attention_rollout(mixed, meta={
        "model": adapter.name, "method": "rollout", "weights": weights,
        "residual": residual if weights == "half" else "measured", "causal": adapter.is_causal,
    })


__all__ += ["rollout"]
