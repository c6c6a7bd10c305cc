"""The hook-free forward of the fast engine: only the layers and positions an edit can reach.

An intervention whose first edit is in layer ``L`` and whose edits touch only query positions
``p0`` onwards leaves, in a causal model, every position before ``p0`` unchanged at every layer,
and every position unchanged before layer ``L``. :class:`BareForward` therefore starts at
layer ``L`` from the cached clean residual of positions ``p0..``, attends to the cached clean
keys and values of positions ``< p0``, and runs only those positions through the later blocks
(for an edit confined to the read row: one row per prompt). The blocks are computed from the
model's own weights and HF norm/MLP modules (:meth:`~lensattr.model.Adapter.bare_layer`),
without the bridge's hook points; the engine's edits are the same hook functions the slow path
attaches, called here with the first position ``p0`` so they edit only their own rows.

It is used only after :meth:`BareForward.check` reproduces the bridge's clean readout on the
engine's own prompts (full and suffix forwards); any model it cannot reproduce (encoders,
interleaved rotary, unknown blocks) keeps the bridge path, with the reason recorded.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from ..core.sites import Site
from ..models import blocks
from ..models.adapter import Adapter, ModelError
from ..models.blocks import apply_rotary

__all__ = ["BareForward", "BARE_SITES", "apply_rotary"]  # apply_rotary: from models.blocks

# hook sites the bare forward runs (every other site sends an intervention to the bridge)
BARE_SITES = {Site.PATTERN, Site.Z, Site.Q, Site.K, Site.V, Site.RESID_FINAL,
              Site.LN_FINAL_SCALE}


class BareForward:
    """Clean caches of one prompt set and the hook-free forward from any (layer, position).

    Caches (model device): ``resid[l]`` the residual entering block l [batch, pos, d_model];
    ``k[l]``, ``v[l]`` keys (rotary applied) and values [batch, pos, kv_head, d_head];
    ``cos``/``sin`` [batch, pos, rotary_dim]. ``ok``/``reason``: whether :meth:`check` passed.
    """

    def __init__(self, adapter: Adapter, tokens: Tensor, attention_mask: Tensor | None,
                 readout):
        self.a, self.readout = adapter, readout
        a = adapter
        if not a.is_causal:
            raise ModelError("bare forward: only causal decoders (positions before an edit "
                             "are unchanged only under a causal mask)")
        self.layers = [a.bare_layer(layer) for layer in range(a.n_layers)]
        self.rotary = self.layers[0].rotary
        store: dict = {}
        sites: tuple[Site, ...] = (Site.RESID_PRE, Site.K, Site.V, Site.RESID_FINAL)
        sites += (Site.COS, Site.SIN) if self.rotary else ()
        try:
            a.read(tokens, attention_mask, readout, a.capture_hooks(sites, store))
        except KeyError as e:  # a hook site this model lacks
            raise ModelError(f"bare forward: {e}") from None
        n, p = tokens.shape
        self.resid = [store[(Site.RESID_PRE, layer)] for layer in range(a.n_layers)]
        self.resid_final = store[(Site.RESID_FINAL, None)]
        self.cos: Tensor | None = None
        self.sin: Tensor | None = None
        if self.rotary:
            if (Site.COS, 0) not in store:
                raise ModelError("bare forward: rotary model without hook_cos")
            self.cos = store[(Site.COS, 0)].expand(n, -1, -1)  # [batch, pos, rot]
            self.sin = store[(Site.SIN, 0)].expand(n, -1, -1)
        self.k = [self._rot(store[(Site.K, layer)], self.cos, self.sin)
                  for layer in range(a.n_layers)]
        self.v = [store[(Site.V, layer)] for layer in range(a.n_layers)]
        dev = a.device
        keys = (torch.ones(n, p, dtype=torch.bool, device=dev) if attention_mask is None
                else attention_mask.to(dev).bool())
        self.key_ok = keys  # [batch, key_pos]
        self.kv_map = blocks.kv_map(a, dev)
        self.ok = False
        self.reason: str | None = "not checked"
        self.n_pos = p
        self.read_last = readout.positions is not None and bool(
            (readout.positions == p - 1).all())

    def _rot(self, x, cos, sin):
        return blocks.rotate(x, cos, sin) if self.rotary else x

    # ---- the forward -------------------------------------------------------------------
    def run(self, idx: Tensor, first_layer: int, first_pos: int, hooks: dict,
            readout, resid: Tensor | None = None, last_read_only: bool = False) -> Tensor:
        """The readout of rows ``idx`` (prompt of each row) with ``hooks`` (functions taking
        ``(x, p0)``, of :data:`BARE_SITES` only), starting at ``first_layer`` and running
        positions ``first_pos`` onwards. ``resid``: the residual entering ``first_layer`` at
        those positions [rows, q, d_model] (default the cached one). ``last_read_only``: in the
        last layer compute keys and values of every position but queries, attention output and
        MLP at the read position only (used only where no hook edits the last layer or the
        final residual)."""
        p0, a = first_pos, self.a
        idx = idx.to(self.resid[0].device)
        last = a.n_layers - 1
        read = None
        if (last_read_only and not self.read_last and readout.positions is not None
                and not any(k[1] is None or k[1] == last for k in hooks)):
            read = readout.positions.to(idx.device) - p0  # [rows] the read row of each row
        with torch.no_grad():
            if resid is not None:
                x = resid
            elif first_layer >= a.n_layers:
                x = self.resid_final[idx, p0:]
            else:
                x = self.resid[first_layer][idx, p0:]  # [rows, q, d_model]
            for layer in range(first_layer, a.n_layers):
                if layer == last and read is not None:
                    x = self._block(layer, x, idx, p0, hooks, read=read)  # [rows, 1, d_model]
                    readout = dataclasses.replace(readout, positions=torch.zeros_like(read))
                    p0 = 0
                else:
                    # the last block matters only at the read position: when every prompt
                    # reads its last position, only that query runs there (with any hooks)
                    # (not under a pattern edit there: it flags rows whose renormalised
                    # mass vanishes at any query, as the bridge path does)
                    at_end = (layer == last and self.read_last and p0 < self.n_pos - 1
                              and (Site.PATTERN, last) not in hooks)
                    q0 = self.n_pos - 1 if at_end else p0
                    x = self._block(layer, x, idx, p0, hooks, q0=q0)
                    p0 = q0
            if read is not None and first_layer > last:  # nothing ran: take the read rows
                x = x[torch.arange(x.shape[0], device=x.device), read][:, None]
                readout = dataclasses.replace(readout, positions=torch.zeros_like(read))
                p0 = 0
            f = hooks.get((Site.RESID_FINAL, None))
            if f is not None:
                x = f(x, p0)
            bound = {k: functools.partial(f, p0=p0) for k, f in hooks.items()
                     if k[0] == Site.LN_FINAL_SCALE}
            return a.read_final(x, readout, bound, first_pos=p0)

    def work(self, first_layer: int, first_pos: int) -> float:
        """Positions x layers one row of :meth:`run` computes, in clean full forwards."""
        L, p = self.a.n_layers, self.n_pos
        if first_layer >= L:
            return 0.0
        last = 1 if self.read_last else p - first_pos
        return ((L - 1 - first_layer) * (p - first_pos) + last) / (L * p)

    def _block(self, layer: int, x: Tensor, idx: Tensor, p0: int, hooks: dict,
               q0: int | None = None, read: Tensor | None = None) -> Tensor:
        """One block on positions p0..; positions ``q0..`` come out (default p0; the earlier
        ones serve as keys and values only); with ``read`` [rows] only each row's read
        position comes out ([rows, 1, d_model]), keys and values still from every position."""
        w = self.layers[layer]
        q = p0 if q0 is None else q0

        def keep(t: Tensor) -> Tensor:
            if read is not None:
                return t[torch.arange(t.shape[0], device=t.device), read][:, None]
            return t[:, q - p0:]

        return blocks.block(w, x, lambda h: self._attention(layer, w, h, idx, p0, hooks, q, read),
                            keep)

    def _attention(self, layer, w, h, idx, p0, hooks, q0, read=None) -> Tensor:
        """Attention output of query positions ``q0..`` (or each row's ``read`` position):
        [rows, q, d_model]; keys and values of positions ``p0..`` from ``h``, earlier ones
        from the cache."""
        r = h.shape[0]
        H = self.a.n_heads
        q, k, v = blocks.project_qkv(w, h, H, self.a.n_kv_heads, self.a.d_head)
        if (Site.Q, layer) in hooks or (Site.K, layer) in hooks or (Site.V, layer) in hooks:
            q, k, v = self._edit_qkv(layer, hooks, p0, q, k, v)  # before rotary, as hook_q/k
        if read is None and q0 > p0:  # queries from q0 only
            q = q[:, q0 - p0:]
        qs = p0 if read is not None else q0
        if self.rotary:
            assert self.cos is not None and self.sin is not None
            q = self._rot(q, self.cos[idx, qs:], self.sin[idx, qs:])
            k = self._rot(k, self.cos[idx, p0:], self.sin[idx, p0:])
        if p0 > 0:  # positions before p0 are unchanged: their cached keys and values
            k = torch.cat((self.k[layer][idx, :p0], k), dim=1)  # [rows, key, kv_head, d_head]
            v = torch.cat((self.v[layer][idx, :p0], v), dim=1)
        k, v = blocks.per_query_head(k, v, self.kv_map, H)  # [rows, key, head, d_head]
        nk = k.shape[1]
        if read is not None:  # only the read row's query: [rows, 1, head, d_head]
            q = q[torch.arange(r, device=q.device), read][:, None]
            qpos = (p0 + read)[:, None]  # [rows, 1]
        else:
            qpos = torch.arange(q0, q0 + q.shape[1], device=idx.device)
        ok = blocks.allowed(self.key_ok[idx, :nk], qpos)[:, None]  # [rows, 1, q, key]
        pattern = blocks.attention_pattern(q, k, w.scale, ok)  # [rows, head, q, key]
        f = hooks.get((Site.PATTERN, layer))
        if f is not None:
            pattern = f(pattern, q0)
        z = blocks.mix(pattern, v)  # [rows, q, head, d_head]
        f = hooks.get((Site.Z, layer))
        if f is not None:
            z = f(z, q0)
        return blocks.project_out(w, z)

    @staticmethod
    def _edit_qkv(layer, hooks, p0, q, k, v):
        """Edits at Site.Q / K / V ([rows, q, head or kv_head, d_head], before rotary)."""
        out = []
        for site, t in ((Site.Q, q), (Site.K, k), (Site.V, v)):
            f = hooks.get((site, layer))
            out.append(t if f is None else f(t, p0))
        return out

    # ---- the check against the bridge ---------------------------------------------------
    def check(self, clean_values: Tensor, first_pos: int) -> bool:
        """Does the bare forward reproduce the bridge's clean readout, from layer 0 over all
        positions and from layer 0 over positions ``first_pos..``? Sets ``ok``/``reason``."""
        idx = torch.arange(self.resid[0].shape[0])

        def case(p0: int):
            return lambda: (self.run(idx, 0, p0, {}, self.readout).float().cpu(),
                            clean_values.float().cpu())

        self.reason = blocks.check_forward(
            ((p0, case(p0)) for p0 in sorted({0, first_pos})),
            lambda p0, diff: (f"the hook-free forward from position {p0} differs from the "
                              f"bridge's clean readout (max |diff| {diff}); using the bridge "
                              "path"), self.a.dtype)
        self.ok = self.reason is None
        return self.ok
