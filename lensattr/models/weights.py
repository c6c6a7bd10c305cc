"""A model's weights as plain tensors: the bridge's stacked per-layer weights (kept, as they
are stacked anew on every access), value weights per query head, norms, the unembedding, and
whole blocks (:class:`BareLayer`) for the hook-free forwards."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ..core.sites import Site, hook_name
from .errors import ModelError
from .fused import fused_mlp

if TYPE_CHECKING:
    from .adapter import Adapter

__all__ = ["BareLayer", "FinalNorm", "stacked_all", "W_V", "b_V", "weight_processing", "ln1",
           "final_norm", "bare_layer", "patterns_from_cache", "optional"]

_STACKED = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")


class BareLayer(NamedTuple):
    """One block as plain tensors (``[head_index or kv_head_index, d_model, d_head]`` and
    ``[.., d_head, d_model]`` weights, biases zeros where absent) and HF modules."""

    ln1: Callable
    ln2: Callable
    mlp: Callable
    W_Q: Tensor
    b_Q: Tensor
    W_K: Tensor
    b_K: Tensor
    W_V: Tensor
    b_V: Tensor
    W_O: Tensor
    b_O: Tensor
    scale: float  # multiplies q.k
    parallel: bool  # attention and MLP both read the block input (GPT-NeoX, GPT-J)
    rotary: bool
    W_QKV: Tensor  # [d_model, (head + 2 kv_head) * d_head]: W_Q, W_K, W_V side by side
    b_QKV: Tensor  # [(head + 2 kv_head) * d_head]
    W_O_flat: Tensor  # [head * d_head, d_model]


class FinalNorm(NamedTuple):
    kind: str  # "layernorm" or "rmsnorm"
    weight: Tensor  # [d_model]
    bias: Tensor | None  # [d_model]


def optional(get: Callable[[], Any]) -> Tensor | None:
    """A weight that a model may lack (bias-free projections raise or give None)."""
    try:
        t = get()
    except (AttributeError, KeyError, IndexError):
        return None
    return None if t is None else t.detach()


def stacked_all(a: Adapter) -> dict[str, Tensor | None]:
    """The bridge's stacked weights (W_Q, b_O, ...: [layer, ...]), detached, None where the
    model has none; kept in the probe store (one copy per live model and set of weights)."""
    store = a._probe_store()
    if "_stacked" not in store:

        def stacked(name: str) -> Tensor | None:
            return optional(lambda: getattr(a.model, name))

        store["_stacked"] = {name: stacked(name) for name in _STACKED}
    return store["_stacked"]


def W_V(a: Adapter, layer: int) -> Tensor:
    w = a.model.W_V[layer].detach()  # [kv_head_index, d_model, d_head]
    return w.repeat_interleave(a.n_heads // a.n_kv_heads, dim=0)


def b_V(a: Adapter, layer: int) -> Tensor:
    try:
        b = a.model.b_V[layer].detach()  # [kv_head_index, d_head]
    except AttributeError:  # TL raises for bias-free checkpoints (Llama)
        return torch.zeros(a.n_heads, a.d_head, device=a.device, dtype=a.dtype)
    return b.repeat_interleave(a.n_heads // a.n_kv_heads, dim=0)


def weight_processing(a: Adapter) -> dict:
    m = a.model
    has_bv = any(bool(b_V(a, i).any()) for i in range(a.n_layers))
    return {"weights_processed": bool(getattr(m, "_weights_processed", False)),
            "compatibility_mode": bool(getattr(m, "compatibility_mode", False)),
            "value_bias_in_b_V": has_bv,
            "zero_ablation": "z := b_V (the attention-independent part b_V @ W_O is kept; "
            "edge edits remove or replace alpha_s (v_s - b_V)), the same numbers whether "
            "or not value biases are folded into b_O"}


def ln1(a: Adapter, layer: int) -> tuple[Tensor, Tensor]:
    ln = a.model.blocks[layer].ln1
    w = getattr(ln, "weight", None)
    w = torch.ones(a.d_model, device=a.device) if w is None else w.detach()
    b = getattr(ln, "bias", None)
    b = torch.zeros_like(w) if b is None else b.detach()
    return w, b


def final_norm(a: Adapter) -> FinalNorm:
    kind = str(getattr(a.cfg, "normalization_type", None) or "")
    ln: Any = getattr(a.model, "ln_final", None)
    weight = optional(lambda: ln.weight) if ln is not None else None
    if kind not in ("LN", "RMS") or weight is None:
        raise ModelError(
            f"model {a.name!r}: final norm of type {kind or 'none'!r}; the direct path "
            "needs a LayerNorm or RMSNorm with a weight (ln_final)"
        )
    bias = optional(lambda: ln.bias) if kind == "LN" else None
    return FinalNorm("layernorm" if kind == "LN" else "rmsnorm", weight, bias)


def bare_layer(a: Adapter, layer: int) -> BareLayer:
    block = a.model.blocks[layer]
    try:  # the bridge's norms (their arithmetic, e.g. TL's own LayerNorm), HF's MLP
        ln1, ln2 = block.ln1, block.ln2
        mlp = fused_mlp(block.mlp.original_component)
        hf_attn = block.attn.original_component
    except AttributeError as e:
        raise ModelError(f"model {a.name!r}: block {layer} has no HF submodules") from e
    scale = getattr(hf_attn, "scaling", None)
    if scale is None:  # GPT-2 keeps flags instead of a scale
        scale = a.d_head ** -0.5 if getattr(hf_attn, "scale_attn_weights", True) else 1.0
        if getattr(hf_attn, "scale_attn_by_inverse_layer_idx", False):
            scale = scale / float(layer + 1)
    stacked = stacked_all(a)

    def get(name, shape=None):
        b = stacked[name]
        if b is None:
            return torch.zeros(shape, device=a.device, dtype=a.dtype)
        return b[layer]

    kvh = a.n_kv_heads
    W_Q, W_K, W_V, W_O = get("W_Q"), get("W_K"), get("W_V"), get("W_O")
    b_Q, b_K = get("b_Q", (a.n_heads, a.d_head)), get("b_K", (kvh, a.d_head))
    b_V = get("b_V", (kvh, a.d_head))

    def flat(W):  # [head, d_model, d_head] -> [d_model, head * d_head]
        return W.permute(1, 0, 2).reshape(W.shape[1], -1)

    return BareLayer(
        ln1=ln1, ln2=ln2, mlp=mlp,
        W_Q=W_Q, b_Q=b_Q, W_K=W_K, b_K=b_K, W_V=W_V, b_V=b_V,
        W_O=W_O, b_O=get("b_O", (a.d_model,)),
        scale=float(scale),
        parallel=bool(getattr(a.cfg, "parallel_attn_mlp", False)),
        rotary=getattr(a.cfg, "positional_embedding_type", "") == "rotary",
        W_QKV=torch.cat((flat(W_Q), flat(W_K), flat(W_V)), dim=1),
        b_QKV=torch.cat((b_Q.reshape(-1), b_K.reshape(-1), b_V.reshape(-1))),
        W_O_flat=W_O.reshape(-1, W_O.shape[-1]),
    )


def patterns_from_cache(a: Adapter, cache) -> list[Tensor]:
    out = []
    for layer in range(a.n_layers):
        name = hook_name(Site.PATTERN, layer)
        try:
            out.append(cache[name].detach().cpu())
        except KeyError:
            raise ValueError(
                f"cache: has no attention pattern {name!r}; run the model with "
                "run_with_cache on the audit's prompts"
            ) from None
    return out
