"""What an attention map claims about a head: type scores, entropy, sink mass.

All scores are computed from token tensors and patterns (no strings), averaged over prompts and
over the query positions where the score is defined, ignoring padding:

* ``previous_token``: mean ``alpha[q, q-1]`` over queries ``q >= 1``.
* ``self``: mean ``alpha[q, q]`` over queries ``q >= 1``.
* ``sink``: mean attention on the sink positions (the roles ``BOS``, ``CLS``, ``SEP``; a prompt
  set without them has no sink and the score is NaN) over the queries that are not sinks.
* ``duplicate_token``: mean attention to earlier copies of the query's token, over queries that
  have one (TransformerLens's duplicate-token idea, on token ids).
* ``induction``: mean attention to the token *after* an earlier copy of the query's token
  (excluding the query itself), over queries that have one.

Each score is taken only over the queries where its pattern is possible (induction only where
the query's token occurred before, e.g. the repeated half of a repeated sequence), and
``queries`` restricts them further (e.g. to the metric's read positions: the head's type at the
read position). A head's type is the best of the specific types (previous-token, self,
duplicate-token, induction) that reaches ``STRIKING``; ``sink`` only when none does, so a head
that copies at the read position and rests on BOS elsewhere is not called a sink.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..core.prompts import PromptSet

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
    """Sink positions of each prompt: its BOS/CLS/SEP roles (none when it declares none; the
    audit adds a BOS role when every prompt starts with the tokenizer's BOS token)."""
    n, p = prompts.tokens.shape
    mask = torch.zeros(n, p, dtype=torch.bool)
    rows = torch.arange(n)
    for r in SINK_ROLES:
        if r in prompts.roles:
            mask[rows, prompts.roles[r]] = True
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
    patterns: Float[Tensor, "batch layer head_index query_pos key_pos"],
    prompts: PromptSet,
    queries: Bool[Tensor, "batch query_pos"] | None = None,
) -> dict[str, Float[Tensor, "layer head_index"]]:
    """Type scores per head, averaged over prompts and the queries where each is defined
    (and selected by ``queries``, default every query)."""
    P = patterns.float()
    tok = prompts.tokens
    valid = prompts.valid if queries is None else prompts.valid & queries
    n, p = tok.shape
    q_idx = torch.arange(p)
    sink = sink_mask(prompts)
    not_sink = valid & ~sink  # [batch, q]: queries whose sink mass is counted
    prev_ok = valid.clone()
    prev_ok[:, 1:] &= prompts.valid[:, :-1]
    prev_ok &= q_idx[None] >= 1
    prev = torch.zeros(P.shape[:-1])
    prev[..., 1:] = torch.diagonal(P, offset=-1, dim1=-2, dim2=-1)
    selfs = torch.diagonal(P, dim1=-2, dim2=-1)
    sink_mass = (P * sink[:, None, None, None, :].to(P.dtype)).sum(-1)
    earlier = torch.ones(p, p, dtype=torch.bool).tril(-1)[None]  # k < q
    real = prompts.valid[:, None, :] & valid[:, :, None]  # [batch, q, k]
    same = (tok[:, :, None] == tok[:, None, :]) & earlier & real  # [batch, q, k]
    after_copy = torch.zeros_like(same)
    after_copy[:, :, 1:] = (
        (tok[:, :, None] == tok[:, None, :-1]) & earlier[:, :, 1:] & real[:, :, 1:]
    )
    dup = (P * same[:, None, None].to(P.dtype)).sum(-1)
    ind = (P * after_copy[:, None, None].to(P.dtype)).sum(-1)
    sink_ok = not_sink if sink.any() else torch.zeros_like(not_sink)  # no sink: undefined
    return {
        "previous_token": _masked_mean(prev, prev_ok),
        "self": _masked_mean(selfs, valid & (q_idx[None] >= 1)),
        "duplicate_token": _masked_mean(dup, same.any(-1)),
        "induction": _masked_mean(ind, after_copy.any(-1)),
        "sink": _masked_mean(sink_mass, sink_ok),
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
    """Type per head and its score: the best specific type reaching STRIKING, else ``sink``
    when the sink score does, else ``"none"`` (score: the best of all, NaN if none defined)."""
    specific = [k for k in TYPE_NAMES if k != "sink"]
    spec = torch.nan_to_num(torch.stack([scores[k] for k in specific], -1), nan=-math.inf)
    best_spec = spec.max(-1)  # [L, H]
    sink = torch.nan_to_num(scores["sink"], nan=-math.inf)
    labels = []
    for row_i, row_v, row_s in zip(best_spec.indices.tolist(), best_spec.values.tolist(),
                                   sink.tolist(), strict=True):
        labels.append([
            specific[i] if v >= STRIKING else ("sink" if s >= STRIKING else "none")
            for i, v, s in zip(row_i, row_v, row_s, strict=True)
        ])  # fmt: skip
    best = torch.maximum(best_spec.values, sink)
    return labels, torch.where(torch.isinf(best), torch.nan, best)
