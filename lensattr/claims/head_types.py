"""What an attention map claims about a head: type scores, entropy, sink mass.

All scores are computed from token tensors and patterns (no strings), averaged over prompts and
over the query positions where the score is defined, ignoring padding:

* ``previous_token``: mean ``alpha[q, q-1]`` over queries ``q >= 1``.
* ``self``: mean ``alpha[q, q]`` over queries ``q >= 1``.
* ``sink``: mean attention on the sink positions (the roles ``BOS``, ``CLS``, ``SEP`` where the
  prompts give them, else the first real token) over the queries that are not sinks.
* ``duplicate_token``: mean attention to earlier copies of the query's token, over queries that
  have one (TransformerLens's duplicate-token idea, on token ids).
* ``induction``: mean attention to the token *after* an earlier copy of the query's token
  (excluding the query itself), over queries that have one.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..prompts import PromptSet

__all__ = [
    "TYPE_NAMES",
    "type_scores",
    "entropy",
    "sink_mask",
    "SINK_ROLES",
    "allowed_keys",
    "label_types",
    "STRIKING",
]

TYPE_NAMES = ("previous_token", "self", "duplicate_token", "induction", "sink")
STRIKING = 0.5  # a head "looks like" a type when its score reaches this


SINK_ROLES = ("BOS", "CLS", "SEP")


def sink_mask(prompts: PromptSet) -> Bool[Tensor, "batch pos"]:
    """Sink positions of each prompt: its BOS/CLS/SEP roles, else its first real token."""
    n, p = prompts.tokens.shape
    mask = torch.zeros(n, p, dtype=torch.bool)
    rows = torch.arange(n)
    roles = [r for r in SINK_ROLES if r in prompts.roles]
    for r in roles:
        mask[rows, prompts.roles[r]] = True
    if not roles:
        mask[rows, prompts.valid.long().argmax(1)] = True  # first real token
    return mask


def allowed_keys(prompts: PromptSet, causal: bool) -> Bool[Tensor, "batch query_pos key_pos"]:
    """Keys each query may attend to: real tokens, and not later ones in a causal model."""
    v = prompts.valid
    allowed = v[:, None, :] & v[:, :, None]
    if causal:
        p = prompts.n_pos
        allowed = allowed & torch.ones(p, p, dtype=torch.bool).tril()[None]
    return allowed


def _masked_mean(x: Tensor, w: Tensor) -> Tensor:
    """Mean of x [batch, L, H, q] over batch and q with weights w [batch, q] (NaN if none)."""
    w = w.to(x.dtype)[:, None, None, :]
    den = w.sum((0, 3))
    return torch.where(den > 0, (x * w).sum((0, 3)) / den.clamp(min=1e-12), float("nan"))


def type_scores(
    patterns: Float[Tensor, "batch layer head_index query_pos key_pos"], prompts: PromptSet
) -> dict[str, Float[Tensor, "layer head_index"]]:
    P = patterns.float()
    tok, valid = prompts.tokens, prompts.valid
    n, p = tok.shape
    q_idx = torch.arange(p)
    sink = sink_mask(prompts)
    not_sink = valid & ~sink  # [batch, q]: queries whose sink mass is counted
    prev_ok = valid.clone()
    prev_ok[:, 1:] &= valid[:, :-1]
    prev_ok &= q_idx[None] >= 1
    prev = torch.zeros(P.shape[:-1])
    prev[..., 1:] = torch.diagonal(P, offset=-1, dim1=-2, dim2=-1)
    selfs = torch.diagonal(P, dim1=-2, dim2=-1)
    sink_mass = (P * sink[:, None, None, None, :].to(P.dtype)).sum(-1)
    earlier = torch.ones(p, p, dtype=torch.bool).tril(-1)[None]  # k < q
    real = valid[:, None, :] & valid[:, :, None]
    same = (tok[:, :, None] == tok[:, None, :]) & earlier & real  # [batch, q, k]
    after_copy = torch.zeros_like(same)
    after_copy[:, :, 1:] = (
        (tok[:, :, None] == tok[:, None, :-1]) & earlier[:, :, 1:] & real[:, :, 1:]
    )
    dup = (P * same[:, None, None].to(P.dtype)).sum(-1)
    ind = (P * after_copy[:, None, None].to(P.dtype)).sum(-1)
    return {
        "previous_token": _masked_mean(prev, prev_ok),
        "self": _masked_mean(selfs, valid & (q_idx[None] >= 1)),
        "duplicate_token": _masked_mean(dup, same.any(-1)),
        "induction": _masked_mean(ind, after_copy.any(-1)),
        "sink": _masked_mean(sink_mass, not_sink),
    }


def entropy(
    patterns: Float[Tensor, "batch layer head_index query_pos key_pos"],
    allowed: Bool[Tensor, "batch query_pos key_pos"],
) -> Float[Tensor, "batch layer head_index query_pos"]:
    """Attention entropy per query divided by log(#allowed keys) (1 = uniform; NaN if 1 key)."""
    P = patterns.float().clamp(min=0)
    h = -(P * torch.log(P.clamp(min=1e-12))).sum(-1)
    n_allowed = allowed.sum(-1).float()[:, None, None, :]  # [batch, 1, 1, q]
    return torch.where(n_allowed > 1, h / torch.log(n_allowed.clamp(min=2)), float("nan"))


def label_types(scores: dict[str, Tensor]) -> tuple[list[list[str]], Tensor]:
    """Best type per head and its score; ``"none"`` when no score reaches STRIKING."""
    stacked = torch.stack([scores[k] for k in TYPE_NAMES], -1)  # [L, H, type]
    best = torch.nan_to_num(stacked, nan=-math.inf).max(-1)
    labels = [
        [TYPE_NAMES[i] if v >= STRIKING else "none" for i, v in zip(row_i, row_v, strict=True)]
        for row_i, row_v in zip(best.indices.tolist(), best.values.tolist(), strict=True)
    ]
    return labels, best.values
