"""One functional attention block: the arithmetic the hook-free forwards share.

Pure functions on a block's :class:`~lensattr.models.adapter.BareLayer` (plain weight tensors
and HF norm/MLP modules), with no hooks and no state, so they run the same under ``no_grad``
(with the cached keys and values of a prefix) and under autograd:

* :func:`kv_map`, :func:`apply_rotary` / :func:`rotate`, :func:`project_qkv`,
  :func:`per_query_head`: queries, keys and values of one layer;
* :func:`allowed`, :func:`attention_pattern` (scores, mask, softmax), :func:`mix`
  (pattern @ v), :func:`project_out` (the output projection, bias included),
  :func:`head_out` (per-head outputs without bias);
* :func:`add_mlp`, :func:`residual`, :func:`block`: a pre-norm block (sequential or parallel
  attention and MLP) with its residual adds;
* :func:`check_forward`: the one check of a hook-free forward against the bridge.

The hook-free no-grad forward (:class:`~lensattr.evidence.bare.BareForward`), the autograd
forward (:class:`~lensattr.evidence.grad_forward.GradForward`) and patching
(:mod:`lensattr.evidence.patch_runs`) compose these; each function keeps the exact
floating-point operations (same matmuls, shapes, casts and order of adds) they used before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..core.precision import FLOAT32_TOL, half_rounding
from .adapter import Adapter, BareLayer

__all__ = ["TOL", "kv_map", "apply_rotary", "rotate", "project_qkv", "per_query_head",
           "allowed", "attention_pattern", "mix", "project_out", "head_out", "add_mlp",
           "residual", "block", "check_forward"]

TOL = FLOAT32_TOL  # a hook-free forward is used only where it reproduces the bridge this closely


def kv_map(adapter: Adapter, device: torch.device | str | None = None) -> Tensor:
    """[head]: the key/value head each query head reads (grouped-query attention), on
    ``device`` (default the model's)."""
    dev = adapter.device if device is None else device
    return torch.tensor([adapter.kv_head(h) for h in range(adapter.n_heads)], device=dev)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's rotate-half rotary embedding on the first ``cos.shape[-1]`` dims of each head
    (partial rotary, as GPT-NeoX): x [batch, pos, head, d_head], cos/sin [batch, pos, rot]."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    half = rd // 2
    rot = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    out = xr * cos[:, :, None] + rot * sin[:, :, None]
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`apply_rotary` with cos/sin cast to ``x``'s dtype."""
    return apply_rotary(x, cos.to(x.dtype), sin.to(x.dtype))


def project_qkv(w: BareLayer, h: Tensor, n_heads: int, n_kv_heads: int, d_head: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Queries [rows, pos, head, d_head], keys and values [rows, pos, kv_head, d_head] of the
    normed input ``h`` [rows, pos, d_model], before rotary: one addmm over W_Q, W_K, W_V side
    by side, as HF's projections compute it."""
    r, n, _ = h.shape
    H, kvh, dh = n_heads, n_kv_heads, d_head
    qkv = torch.addmm(w.b_QKV, h.reshape(r * n, -1), w.W_QKV).view(r, n, -1)
    q, k, v = qkv.split((H * dh, kvh * dh, kvh * dh), dim=-1)
    return q.view(r, n, H, dh), k.view(r, n, kvh, dh), v.view(r, n, kvh, dh)


def per_query_head(k: Tensor, v: Tensor, kv: Tensor, n_heads: int) -> tuple[Tensor, Tensor]:
    """Keys and values [rows, key, head, d_head] per query head (``kv``: :func:`kv_map`);
    unchanged without grouped-query attention."""
    if k.shape[2] == n_heads:
        return k, v
    return k[:, :, kv], v[:, :, kv]


def allowed(key_ok: Tensor, qpos: Tensor) -> Tensor:
    """[rows, query, key]: may the query at position ``qpos`` attend to key ``j`` (causal mask,
    ``j <= qpos``, and padding, ``key_ok`` [rows, key]); ``qpos`` [query] (every row) or
    [rows, query]."""
    nk = key_ok.shape[1]
    causal = torch.arange(nk, device=key_ok.device) <= qpos[..., None]  # [(rows,) q, key]
    if causal.dim() == 2:
        causal = causal[None]
    return causal & key_ok[:, None, :]


def attention_pattern(q: Tensor, k: Tensor, scale: float, ok: Tensor) -> Tensor:
    """The attention pattern [rows, head, query, key] of queries q [rows, query, head, d_head]
    and keys k [rows, key, head, d_head] (per query head): scaled scores, the positions not
    ``ok`` ([rows, 1, query, key]) at the dtype's minimum, a float32 softmax cast back."""
    scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * scale  # [rows, head, q, key]
    scores = scores.masked_fill(~ok, torch.finfo(scores.dtype).min)
    return torch.softmax(scores.float(), dim=-1).to(q.dtype)


def mix(pattern: Tensor, v: Tensor) -> Tensor:
    """Head outputs z [rows, query, head, d_head]: pattern [rows, head, query, key] @ values
    v [rows, key, head, d_head] (per query head)."""
    return (pattern @ v.transpose(1, 2)).transpose(1, 2)


def project_out(w: BareLayer, z: Tensor) -> Tensor:
    """The attention output [rows, query, d_model] of z [rows, query, head, d_head]: one addmm
    with the output bias."""
    r, nq = z.shape[0], z.shape[1]
    return torch.addmm(w.b_O, z.reshape(r * nq, -1), w.W_O_flat).view(r, nq, -1)


def head_out(z: Tensor, W_O: Tensor) -> Tensor:
    """The heads' summed output without bias [rows, query, d_model] of z (or a change of z)
    [rows, query, head, d_head], through W_O [head, d_head, d_model] (cast to z's dtype)."""
    return torch.einsum("rqhe,hed->rqd", z, W_O.to(z.dtype))


def add_mlp(w: BareLayer, x: Tensor) -> Tensor:
    """``x`` plus the MLP's output on it (the second half of a sequential block)."""
    return x + w.mlp(w.ln2(x))


def residual(w: BareLayer, x: Tensor, attn: Tensor) -> Tensor:
    """A pre-norm block's output from its input ``x`` and attention output ``attn``: parallel
    blocks (GPT-NeoX, GPT-J) ``x + attn + mlp(ln2(x))``, sequential ones
    ``mid + mlp(ln2(mid))`` with ``mid = x + attn``."""
    if w.parallel:
        return x + attn + w.mlp(w.ln2(x))
    return add_mlp(w, x + attn)


def block(w: BareLayer, x: Tensor, attend: Callable[[Tensor], Tensor],
          keep: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """One pre-norm block: ``attend`` maps ``ln1(x)`` to the attention output of the positions
    that come out; ``keep`` selects those positions of ``x`` (default all)."""
    attn = attend(w.ln1(x))
    if keep is not None:
        x = keep(x)
    return residual(w, x, attn)


def check_forward(cases: Iterable[tuple[Any, Callable[[], tuple[Tensor, Tensor]]]],
                  differs: Callable[[Any, float | None], str],
                  dtype: torch.dtype | None = None) -> str | None:
    """The check of a hook-free forward against the bridge: None when every case's
    ``compute()`` gives (got, want) of one shape equal within :data:`TOL` (as float32; for a
    model in half precision, ``dtype``, within :func:`~lensattr.core.precision.half_rounding`
    of the values' scale, ``max |want| + 1``), else the reason: ``differs(key, max |diff|)``
    (None for a shape mismatch), or the exception a case raised (an architecture the
    functional blocks do not cover)."""
    half = half_rounding(dtype)
    try:
        for key, compute in cases:
            got, want = compute()
            got, want = got.float(), want.float()
            if got.shape != want.shape:
                return differs(key, None)
            if half is None:
                ok = torch.allclose(got, want, atol=TOL, rtol=TOL)
            else:
                ok = bool((got - want).abs().max() <= half * (want.abs().max() + 1))
            if not ok:
                return differs(key, (got - want).abs().max().item())
    except Exception as e:  # an architecture the bare blocks do not cover
        return f"hook-free forward failed ({type(e).__name__}: {e})"
    return None
