"""A differentiable, hook-free forward of a causal decoder, for gradient-based attribution.

It runs the blocks from the model's own weights and HF norm/MLP modules
(:meth:`~lensattr.model.Adapter.bare_layer`, as :mod:`.bare` does) with autograd on, and hands
back every layer's queries and keys (rotary applied), values, attention pattern and head
outputs as tensors of the graph, so one ``torch.autograd.grad`` gives the metric's gradient at
all of them, with no hook machinery in the way. Options:

* ``resid0``: the residual entering block 0 is an input, so integrated gradients can
  interpolate it between the clean and corrupted embeddings;
* the last block's MLP runs only at the position each prompt's readout reads (one per prompt:
  ``columns`` / ``logits`` readouts), the other positions cannot reach the readout;
* ``drop_layer``: GradDrop (AtP*): block ``drop_layer``'s contribution to the residual stream
  (attention plus MLP output) keeps its value but passes no gradient back.

It is used only after :meth:`GradForward.check` reproduces the bridge's readout on the
caller's prompts (≤1e-4); otherwise the caller falls back to the bridge with hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..metrics import Readout
from ..model import Adapter, ModelError, Site
from .bare import apply_rotary

__all__ = ["GradForward", "LayerActs", "Embedded"]

_TOL = 1e-4


@dataclass
class LayerActs:
    """One layer's activations in a forward. q [batch, pos, head, d_head] and k
    [batch, pos, kv_head, d_head] after rotary; v [batch, pos, kv_head, d_head]; pattern
    [batch, head, query_pos, key_pos]; z [batch, pos, head, d_head]."""

    q: Tensor
    k: Tensor
    v: Tensor
    pattern: Tensor
    z: Tensor

    def tensors(self) -> list[Tensor]:
        return [self.q, self.k, self.v, self.pattern, self.z]

    def detached(self) -> LayerActs:
        return LayerActs(*(t.detach() for t in self.tensors()))


@dataclass
class Embedded:
    """The residual entering block 0 [batch, pos, d_model], rotary cos/sin [batch, pos, rot]
    (or None) and the keys each row may attend to [batch, key_pos] (its attention mask)."""

    resid0: Tensor
    cos: Tensor | None
    sin: Tensor | None
    key_ok: Tensor


class GradForward:
    """The differentiable forward of one causal decoder (see the module docstring)."""

    def __init__(self, adapter: Adapter):
        a = self.a = adapter
        if not a.is_causal:
            raise ModelError("grad forward: only causal decoders")
        self.layers = [a.bare_layer(layer) for layer in range(a.n_layers)]
        self.rotary = self.layers[0].rotary
        self.kv_map = torch.tensor([a.kv_head(h) for h in range(a.n_heads)], device=a.device)

    def embed(self, tokens: Tensor, attention_mask: Tensor | None) -> Embedded:
        """Block 0's input from the bridge (embedding, positions), stopping inside layer 0."""
        a, store = self.a, {}
        sites = (Site.RESID_PRE,) + ((Site.COS, Site.SIN) if self.rotary else ())
        hooks = a.capture_hooks(sites, store)
        a._capture(tokens, attention_mask, hooks, (Site.Z, 0))
        n, p = tokens.shape
        cos = sin = None
        if self.rotary:
            if (Site.COS, 0) not in store:
                raise ModelError("grad forward: rotary model without hook_cos")
            cos = store[(Site.COS, 0)].expand(n, -1, -1)
            sin = store[(Site.SIN, 0)].expand(n, -1, -1)
        key_ok = (torch.ones(n, p, dtype=torch.bool, device=a.device) if attention_mask is None
                  else attention_mask.to(a.device).bool())
        return Embedded(store[(Site.RESID_PRE, 0)], cos, sin, key_ok)

    def embed_pair(self, first, second) -> tuple[Embedded, Embedded]:
        """:meth:`embed` of two prompt sets of one shape (``tokens``, ``attention_mask``) in
        one bridge call."""
        n = first.tokens.shape[0]
        masks = (first.attention_mask, second.attention_mask)
        mask = None if masks == (None, None) else torch.cat(
            [torch.ones_like(first.tokens) if m is None else m for m in masks])
        both = self.embed(torch.cat((first.tokens, second.tokens)), mask)

        def half(t, s):
            return None if t is None else t[s]

        return tuple(Embedded(*(half(t, s) for t in (both.resid0, both.cos, both.sin,
                                                     both.key_ok)))
                     for s in (slice(0, n), slice(n, 2 * n)))

    def run(self, emb: Embedded, readout, resid0: Tensor | None = None,
            drop_layer: int | None = None) -> tuple[Tensor, list[LayerActs]]:
        """(readout values, per-layer activations), in the autograd graph when grad is on.
        ``resid0`` replaces ``emb.resid0`` (integrated gradients); ``drop_layer``: GradDrop."""
        x = emb.resid0 if resid0 is None else resid0
        acts = []
        rows = torch.arange(x.shape[0], device=x.device)
        read = readout.positions.to(x.device)  # [batch] the one position each prompt reads
        last = len(self.layers) - 1
        for layer, w in enumerate(self.layers):
            h = w.ln1(x)
            attn, la = self._attention(layer, w, h, emb)
            acts.append(la)
            if layer == last:  # only the read rows reach the readout: [batch, 1, d_model]
                x, attn = x[rows, read][:, None], attn[rows, read][:, None]
            if w.parallel:
                out = x + attn + w.mlp(w.ln2(x))
            else:
                mid = x + attn
                out = mid + w.mlp(w.ln2(mid))
            if layer == drop_layer:  # same value; the gradient skips this block's contribution
                out = out.detach() + (x - x.detach())
            x = out
        at_read = Readout(readout.kind, torch.zeros_like(readout.positions), readout.columns)
        return self.a.read_final(x, at_read, grad=torch.is_grad_enabled()), acts

    def _attention(self, layer, w, h, emb: Embedded) -> tuple[Tensor, LayerActs]:
        W_QKV, b_QKV, W_O = w.W_QKV, w.b_QKV, w.W_O_flat
        r, n, _ = h.shape
        H, kvh, dh = self.a.n_heads, self.a.n_kv_heads, self.a.d_head
        qkv = torch.addmm(b_QKV, h.reshape(r * n, -1), W_QKV).view(r, n, -1)
        q, k, v = qkv.split((H * dh, kvh * dh, kvh * dh), dim=-1)
        q, k, v = q.view(r, n, H, dh), k.view(r, n, kvh, dh), v.view(r, n, kvh, dh)
        if self.rotary:
            q = apply_rotary(q, emb.cos.to(q.dtype), emb.sin.to(q.dtype))
            k = apply_rotary(k, emb.cos.to(k.dtype), emb.sin.to(k.dtype))
        kq, vq = (k[:, :, self.kv_map], v[:, :, self.kv_map]) if kvh != H else (k, v)
        scores = (q.transpose(1, 2) @ kq.permute(0, 2, 3, 1)) * w.scale  # [rows, head, q, key]
        scores = scores.masked_fill(~self.allowed(emb)[:, None], torch.finfo(scores.dtype).min)
        pattern = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        z = (pattern @ vq.transpose(1, 2)).transpose(1, 2)  # [rows, pos, head, d_head]
        out = torch.addmm(w.b_O, z.reshape(r * n, H * dh), W_O).view(r, n, -1)
        return out, LayerActs(q, k, v, pattern, z)

    @staticmethod
    def allowed(emb: Embedded) -> Tensor:
        """[rows, query_pos, key_pos]: may query i attend to key j (causal and padding)."""
        p = emb.key_ok.shape[1]
        causal = torch.ones(p, p, dtype=torch.bool, device=emb.key_ok.device).tril()
        return causal[None] & emb.key_ok[:, None, :]


    def check(self, tokens: Tensor, attention_mask: Tensor | None, readout) -> str | None:
        """None when this forward reproduces the bridge's readout of ``tokens`` (≤1e-4),
        else the reason it cannot be used."""
        try:
            with torch.no_grad():
                want = self.a.read(tokens, attention_mask, readout).float()
                got, _ = self.run(self.embed(tokens, attention_mask), readout)
        except Exception as e:  # an architecture the bare blocks do not cover
            return f"hook-free forward failed ({type(e).__name__}: {e})"
        got = got.float()
        if got.shape != want.shape or not torch.allclose(got, want, atol=_TOL, rtol=_TOL):
            diff = (got - want).abs().max().item() if got.shape == want.shape else None
            return f"hook-free forward differs from the bridge (max |diff| {diff})"
        return None
