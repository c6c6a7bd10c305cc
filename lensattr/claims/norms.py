"""Norm-based attention (Kobayashi et al. 2020) and its residual-aware variant (Kobayashi et al.
2021): how *much* each source moves a query's output, not only how much it is looked at.

Per head h at layer l, the output at query q is ``sum_s alpha_h[q, s] f_h(x_s)`` with the
value-and-output map ``f_h(x_s) = v_h[s] @ W_O[h]`` (``v`` read from ``hook_v``, so it includes
the value bias and, in pre-norm models, the first norm; grouped-query attention: query head h
uses key/value head ``h // (n_heads / n_kv_heads)``). Norm-based attention is

* per head: ``||alpha_h[q, s] f_h(x_s)|| = alpha_h[q, s] * ||f_h(x_s)||``;
* per layer: ``||sum_h alpha_h[q, s] f_h(x_s)||``, computed exactly from a per-source Gram
  matrix of the heads' vectors (no ``[q, s, d_model]`` tensor is formed).

**Value bias.** ``b_V`` enters every source's vector as ``b_V @ W_O``; because each row of alpha
sums to one it adds exactly ``b_V @ W_O`` to the head's output whatever the attention. With
``value_bias="include"`` (default, Kobayashi 2020's f) it stays in each source's vector; with
``"separate"`` it is removed from every source and reported apart as ``bias_norm`` =
``||b_V @ W_O||`` per head (the attention-independent part). The output bias ``b_O`` is never
per source.

**Residual-aware variant (Kobayashi et al. 2021, "attention + residual (+ norm)").** We chose it
over ALTI (Ferrando et al. 2022) because it is an *exact* linear decomposition of the layer's
mixed vector into per-source vectors (tested to sum to the model's own tensor), and ALTI's
contribution score is a heuristic (a Manhattan-distance proximity) computed on top of that same
decomposition; the per-source norms are also what rollout's "measured residual weights" need.
At query q the attention sublayer plus its residual is
``x_q + sum_s sum_h alpha_h[q, s] f_h(x_s) + b_O``. The per-source vector is
``c[q, s] = sum_h alpha_h[q, s] f_h(x_s) + [s == q] x_q``; in a post-norm encoder (BERT) the
following norm is applied with its scale frozen from the run, ``g(c) = (c - mean(c)) * w /
scale_q``, which is linear, so ``sum_s g(c[q, s]) + g(b_O) + ln_bias`` is the norm's output.
The variant reports ``||c[q, s]||`` (pre-norm) or ``||g(c[q, s])||`` (post-norm) per layer.
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

__all__ = ["NormAttention", "norm_attention", "norm_attention_from", "residual_norms_from",
           "head_value_vectors"]

VALUE_BIAS = ("include", "separate")
_CHUNK = 1 << 22  # float64 elements of value vectors per step (32 MB)


@dataclass
class NormAttention:
    """Norm-based attention of one run. Axes: batch, layer, head_index, query_pos, key_pos.

    ``per_head[b, l, h, q, s] = ||alpha f_h(x_s)||``; ``per_layer[b, l, q, s] =
    ||sum_h alpha_h f_h(x_s)||``; ``residual[b, l, q, s]``: the residual-aware variant
    (Kobayashi 2021; the residual sits on the diagonal); ``bias_norm[l, h] = ||b_V W_O||``
    (NaN with ``value_bias="include"``, where it is inside every source's vector).
    Entries of padded keys or queries, and future keys in a causal model, are 0.
    """

    per_head: Float[Tensor, "batch layer head_index query_pos key_pos"]
    per_layer: Float[Tensor, "batch layer query_pos key_pos"]
    residual: Float[Tensor, "batch layer query_pos key_pos"]
    bias_norm: Float[Tensor, "layer head_index"]
    value_bias: str
    meta: dict = field(default_factory=dict)

    def normalised(self, which: str = "per_head") -> Tensor:
        """``which`` (per_head, per_layer or residual) divided by its row sums (rows of zeros
        stay NaN): a distribution over sources comparable with the attention pattern."""
        x = getattr(self, which)
        s = x.sum(-1, keepdim=True)
        return torch.where(s > 0, x / s.clamp(min=1e-30), torch.nan)

    def to_frame(self) -> pd.DataFrame:
        """One row per (prompt, layer, head, query_pos, key_pos) with ``norm`` and its row
        share ``norm_share``; keys after the query (causal) are left out."""
        b, n_l, n_h, q, k = self.per_head.shape
        share = self.normalised("per_head")
        idx = torch.cartesian_prod(*(torch.arange(n) for n in (b, n_l, n_h, q, k)))
        keep = (idx[:, 4] <= idx[:, 3]) if self.meta.get("causal", False) else slice(None)
        idx = idx[keep]
        return pd.DataFrame({
            "prompt": idx[:, 0].numpy(), "layer": idx[:, 1].numpy(), "head": idx[:, 2].numpy(),
            "query_pos": idx[:, 3].numpy(), "key_pos": idx[:, 4].numpy(),
            "norm": self.per_head.reshape(-1)[keep].numpy(),
            "norm_share": share.reshape(-1)[keep].numpy(),
        })  # fmt: skip


def head_value_vectors(
    v: Float[Tensor, "batch pos kv_head d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
    b_V: Float[Tensor, "head_index d_head"] | None = None,
) -> Float[Tensor, "batch head_index pos d_model"]:
    """``f_h(x_s) = v[s, kv(h)] @ W_O[h]`` for every query head (minus ``b_V @ W_O`` when
    ``b_V`` is given)."""
    n_heads = W_O.shape[0]
    vq = v.repeat_interleave(n_heads // v.shape[2], dim=2)  # [batch, pos, head, d_head]
    if b_V is not None:
        vq = vq - b_V[None, None]
    return torch.einsum("bphd,hdm->bhpm", vq, W_O)


def _layer_norms(
    alpha: Float[Tensor, "batch head_index query_pos key_pos"],
    f: Float[Tensor, "batch head_index key_pos d_model"],
    metric: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(per-head norms [b, h, q, s], per-layer norms squared [b, q, s]) with inner product
    ``<a, b> = a^T M b`` where ``metric`` is the diagonal-plus-projection M (None: identity)."""
    fm = f if metric is None else f @ metric  # [b, h, s, d]
    sq = (fm * f).sum(-1).clamp(min=0)  # [b, h, s]
    per_head = alpha * sq.sqrt()[:, :, None, :]
    gram = torch.einsum("bhsd,bgsd->bshg", fm, f)  # [b, s, h, h]
    layer_sq = torch.einsum("bhqs,bshg,bgqs->bqs", alpha, gram, alpha)
    return per_head, layer_sq


def norm_attention_from(
    patterns: list[Tensor],
    values: list[Tensor],
    W_O: list[Tensor],
    b_V: list[Tensor] | None = None,
    resid_pre: list[Tensor] | None = None,
    ln: list[tuple[Tensor, Tensor]] | None = None,
    value_bias: str = "include",
) -> NormAttention:
    """Pure function over cached tensors, one list entry per layer: ``patterns``
    [batch, head, q, k], ``values`` [batch, pos, kv_head, d_head] (hook_v), ``W_O``
    [head, d_head, d_model], ``b_V`` [head, d_head]. ``resid_pre`` [batch, pos, d_model]
    enables the residual-aware variant (NaN without it); ``ln`` gives per layer (weight
    [d_model], scale [batch, pos, 1]) of a post-norm encoder's norm after attention."""
    if value_bias not in VALUE_BIAS:
        raise ValueError(f"value_bias: expected one of {VALUE_BIAS}, got {value_bias!r}")
    heads, layers, resid, bias = [], [], [], []
    for i, (a, v, wo) in enumerate(zip(patterns, values, W_O, strict=True)):
        wo = wo.double()
        bv = None if b_V is None else b_V[i].double()
        sep = value_bias == "separate" and bv is not None
        bias.append(torch.einsum("hd,hdm->hm", bv, wo).norm(dim=-1) if sep
                    else torch.full((wo.shape[0],), torch.nan, dtype=torch.float64))
        # each prompt on its own: a few prompts at a time, so the value vectors f
        # [prompts, head, pos, d_model] (float64) stay within _CHUNK elements
        b, n_pos = a.shape[0], a.shape[-1]
        step = max(1, _CHUNK // max(1, wo.shape[0] * n_pos * wo.shape[-1]))
        parts = [_layer_part(a[j:j + step], v[j:j + step], wo, bv, sep,
                             None if resid_pre is None else resid_pre[i][j:j + step],
                             None if ln is None else (ln[i][0], ln[i][1][j:j + step]))
                 for j in range(0, b, step)]
        heads.append(torch.cat([p[0] for p in parts]))
        layers.append(torch.cat([p[1] for p in parts]))
        resid.append(torch.cat([p[2] for p in parts]))
    return NormAttention(
        per_head=torch.stack(heads, 1).float(),
        per_layer=torch.stack(layers, 1).float(),
        residual=torch.stack(resid, 1).float(),
        bias_norm=torch.stack(bias).float(),
        value_bias=value_bias,
    )


def _layer_part(a, v, wo, bv, sep: bool, x, ln) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's (per-head norms, per-layer norms, residual-aware norms) for some prompts."""
    a, v = a.double(), v.double()
    f = head_value_vectors(v, wo, bv if sep else None)  # [b, h, s, d]
    per_head, layer_sq = _layer_norms(a, f)
    layer = layer_sq.clamp(min=0).sqrt()
    if x is None:
        return per_head, layer, torch.full_like(layer, torch.nan)
    if sep:  # the residual-aware vectors always carry b_V: they decompose the real sum
        f = head_value_vectors(v, wo)
    return per_head, layer, residual_norms_from(a, f, x.double(), ln)


def residual_norms_from(
    alpha: Float[Tensor, "batch head_index query_pos key_pos"],
    f: Float[Tensor, "batch head_index key_pos d_model"],
    x: Float[Tensor, "batch query_pos d_model"],
    ln: tuple[Tensor, Tensor] | None = None,
) -> Float[Tensor, "batch query_pos key_pos"]:
    """``||g(sum_h alpha_h[q, s] f_h(x_s) + [s == q] x_q)||`` (Kobayashi 2021), g the identity
    or, with ``ln = (weight [d_model], scale [batch, pos, 1])``, the post-norm's linear map
    ``(c - mean c) * weight / scale_q``. Exact, via Gram matrices in the metric of g."""
    d = f.shape[-1]
    metric = None
    if ln is not None:
        w = ln[0].double()
        centre = torch.eye(d, dtype=torch.float64) - 1.0 / d
        metric = centre @ torch.diag(w * w) @ centre  # g(a).g(b) = a^T M b / scale^2
    fm = f if metric is None else f @ metric
    gram = torch.einsum("bhsd,bgsd->bshg", fm, f)
    sq = torch.einsum("bhqs,bshg,bgqs->bqs", alpha, gram, alpha)  # attention part
    xm = x if metric is None else x @ metric
    diag_alpha = torch.diagonal(alpha, dim1=-2, dim2=-1)  # [b, h, q]: alpha_h[q, q]
    cross = torch.einsum("bhq,bhqd,bqd->bq", diag_alpha, fm, x)  # <attention part, x_q> at s=q
    self_sq = (xm * x).sum(-1)  # [b, q]
    q = sq.shape[-1]
    eye = torch.eye(q, dtype=torch.bool)
    sq = sq + torch.where(eye[None], (2 * cross + self_sq)[:, :, None], 0.0)
    if ln is not None:
        sq = sq / ln[1].double().reshape(sq.shape[0], q, 1) ** 2
    return sq.clamp(min=0).sqrt()


def norm_attention(
    model, tokens: Tensor | PromptSet, attention_mask: Tensor | None = None,
    value_bias: str = "include"
) -> NormAttention:
    """Norm-based attention of ``model`` on ``tokens`` (token ids ``[batch, pos]``, or a
    :class:`~lensattr.core.prompts.PromptSet` with its mask); one forward pass with hooks."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    tokens, attention_mask = token_inputs(tokens, attention_mask)
    sites = [Site.PATTERN, Site.V, Site.RESID_PRE] + ([Site.LN1_SCALE] if adapter.post_norm
                                                      else [])
    st = adapter.cache(tokens, attention_mask, sites=tuple(sites))
    L = range(adapter.n_layers)

    def cpu(x: Tensor) -> Tensor:
        return x.detach().cpu()

    ln = None
    if adapter.post_norm:
        ln = [(cpu(adapter.ln1(i)[0]), cpu(st[(Site.LN1_SCALE, i)])) for i in L]
    out = norm_attention_from(
        patterns=[cpu(st[(Site.PATTERN, i)]) for i in L],
        values=[cpu(st[(Site.V, i)]) for i in L],
        W_O=[cpu(adapter.W_O(i)) for i in L],
        b_V=[cpu(adapter.b_V(i)) for i in L],
        resid_pre=[cpu(st[(Site.RESID_PRE, i)]) for i in L],
        ln=ln,
        value_bias=value_bias,
    )
    if attention_mask is not None:  # padded queries and keys carry nothing
        m = attention_mask.cpu().bool()
        pair = (m[:, :, None] & m[:, None, :]).float()  # [b, q, k]
        out.per_head = out.per_head * pair[:, None, None]
        out.per_layer = out.per_layer * pair[:, None]
        out.residual = out.residual * pair[:, None]
    out.meta = {"model": adapter.name, "method": "norm_attention", "value_bias": value_bias,
                "residual_variant": "kobayashi2021" + ("+ln" if adapter.post_norm else ""),
                "causal": adapter.is_causal}
    return out
