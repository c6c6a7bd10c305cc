"""A differentiable, hook-free forward of a causal decoder, for gradient-based attribution.

It runs the blocks from the model's own weights and HF norm/MLP modules
(:meth:`~lensattr.model.Adapter.bare_layer`, as :mod:`.bare` does) with autograd on, and hands
back every layer's queries and keys (rotary applied), values, attention pattern and head
outputs as tensors of the graph, so one ``torch.autograd.grad`` gives the metric's gradient at
all of them, with no hook machinery in the way. Options:

* ``resid0``: the residual entering block 0 is an input, so integrated gradients can
  interpolate it between the clean and corrupted embeddings;
* ``native_norms``: HF's own ``nn.LayerNorm`` modules instead of the bridge's (TL's
  arithmetic: eight element-wise passes, forward and backward); they differ by rounding;
* the last block's MLP runs only at the position each prompt's readout reads (one per prompt:
  ``columns`` / ``logits`` readouts), the other positions cannot reach the readout;
* ``drop_layer``: GradDrop (AtP*): block ``drop_layer``'s contribution to the residual stream
  (attention plus MLP output) keeps its value but passes no gradient back;
* a shared prefix (:meth:`GradForward.shared_prefix`, :meth:`GradForward.prefix`): where two
  runs have the same block-0 input at every position before ``p0`` (clean and corrupted prompts
  that first differ at ``p0``), everything at those positions is the same in both runs. It is
  computed once, without autograd, and each run then starts at ``p0``, attending to the
  prefix's cached keys and values: its activations (and their gradients) cover positions
  ``p0`` onwards only (``LayerActs.p0``).

It is used only after :meth:`GradForward.check` reproduces the bridge's readout on the
caller's prompts (≤1e-4); otherwise the caller falls back to the bridge with hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.metric import Readout
from ..core.prompts import PromptSet
from ..core.sites import Site
from ..models import blocks
from ..models.adapter import Adapter, BareLayer, ModelError

__all__ = ["GradForward", "LayerActs", "Embedded", "Prefix"]


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
    # a run started at query position p0 (a shared prefix): q, k, v, z and the pattern's rows
    # cover positions p0.. only; the pattern's columns, every key position; k_pre: the
    # prefix's keys [batch, p0, kv_head, d_head] (rotary applied), constants of the run
    p0: int = 0
    k_pre: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        return [self.q, self.k, self.v, self.pattern, self.z]

    def detached(self) -> LayerActs:
        q, k, v, pattern, z = (t.detach() for t in self.tensors())
        return LayerActs(q, k, v, pattern, z, p0=self.p0, k_pre=self.k_pre)

    def k_all(self) -> Tensor:
        """Keys of every position [batch, pos, kv_head, d_head], prefix included."""
        return self.k if self.k_pre is None else torch.cat((self.k_pre, self.k), 1)


@dataclass
class Embedded:
    """The residual entering block 0 [batch, pos, d_model], rotary cos/sin [batch, pos, rot]
    (or None) and the keys each row may attend to [batch, key_pos] (its attention mask).
    ``q0``: the absolute position of the first query row (a window after a shared prefix:
    ``resid0``, ``cos``, ``sin`` cover positions q0.., ``key_ok`` every key position)."""

    resid0: Tensor
    cos: Tensor | None
    sin: Tensor | None
    key_ok: Tensor
    q0: int = 0

    def window(self, start: int, stop: int | None = None) -> Embedded:
        """Query rows ``start:stop`` (absolute positions), keys ``:stop``."""
        a, b = start - self.q0, None if stop is None else stop - self.q0

        def cut(t):
            return None if t is None else t[:, a:b]

        return Embedded(cut(self.resid0), cut(self.cos), cut(self.sin),
                        self.key_ok[:, :stop], start)


def _native(norm):
    """The HF ``nn.LayerNorm`` inside a bridge norm (one fused kernel, forward and backward),
    else the bridge norm itself."""
    inner = getattr(norm, "original_component", None)
    return inner if isinstance(inner, torch.nn.LayerNorm) else norm


@dataclass
class Prefix:
    """Positions ``:p0`` shared by two runs: per layer, keys (rotary applied) and values
    [batch, p0, kv_head, d_head]."""

    p0: int
    k: list[Tensor]
    v: list[Tensor]


class GradForward:
    """The differentiable forward of one causal decoder (see the module docstring)."""

    def __init__(self, adapter: Adapter, native_norms: bool = False):
        a = self.a = adapter
        if not a.is_causal:
            raise ModelError("grad forward: only causal decoders")
        self.layers = [a.bare_layer(layer) for layer in range(a.n_layers)]
        self.native_norms = False  # True when some norm is HF's fused one
        if native_norms:  # HF's fused LayerNorm where the block has one (not TL's arithmetic)
            hf_blocks = a.model.blocks
            native = [w._replace(ln1=_native(hf_blocks[i].ln1), ln2=_native(hf_blocks[i].ln2))
                      for i, w in enumerate(self.layers)]
            self.native_norms = any(n.ln1 is not w.ln1 or n.ln2 is not w.ln2
                                    for n, w in zip(native, self.layers, strict=True))
            self.layers = native
        self.rotary = self.layers[0].rotary
        self.kv_map = blocks.kv_map(a)

    def embed(self, tokens: Tensor, attention_mask: Tensor | None) -> Embedded:
        """Block 0's input from the bridge (embedding, positions), stopping inside layer 0."""
        a, store = self.a, dict[tuple[Site, int | None], Tensor]()
        sites = (Site.RESID_PRE,) + ((Site.COS, Site.SIN) if self.rotary else ())
        hooks = a.capture_hooks(sites, store)
        # stop once block 0's input (and, rotary, its cos/sin: inside the attention) is seen
        a._capture(tokens, attention_mask, hooks,
                   (Site.Z, 0) if self.rotary else (Site.RESID_PRE, 0))
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

        lo, hi = (Embedded(half(both.resid0, s), half(both.cos, s), half(both.sin, s),
                           half(both.key_ok, s))
                  for s in (slice(0, n), slice(n, 2 * n)))
        return lo, hi

    def run(self, emb: Embedded, readout, resid0: Tensor | None = None,
            drop_layer: int | None = None, prefix: Prefix | None = None
            ) -> tuple[Tensor, list[LayerActs]]:
        """(readout values, per-layer activations), in the autograd graph when grad is on.
        ``resid0`` replaces ``emb.resid0`` (integrated gradients); ``drop_layer``: GradDrop;
        ``prefix``: start at ``prefix.p0`` (every read position must be at or after it)."""
        p0 = 0 if prefix is None else prefix.p0
        if p0:
            emb = emb.window(p0)
            resid0 = None if resid0 is None else resid0[:, p0:]
        x = emb.resid0 if resid0 is None else resid0
        acts: list[LayerActs] = []
        rows = torch.arange(x.shape[0], device=x.device)
        read = readout.positions.to(x.device) - p0  # [batch] the one row each prompt reads
        if bool((read < 0).any()):
            raise ValueError(f"prefix: ends at {p0}, after a read position")
        last = len(self.layers) - 1
        for layer, w in enumerate(self.layers):
            kv = None if prefix is None else (prefix.k[layer], prefix.v[layer])
            # the last block: only the read rows reach the readout: [batch, 1, d_model]
            only = read if layer == last else None
            out = blocks.block(w, x, self._attend(w, emb, kv, only, acts),
                               None if only is None else (lambda t: t[rows, read][:, None]))
            if only is not None:
                x = x[rows, read][:, None]
            if layer == drop_layer:  # same value; the gradient skips this block's contribution
                out = out.detach() + (x - x.detach())
            x = out
        at_read = Readout(readout.kind, torch.zeros_like(readout.positions), readout.columns)
        return self.a.read_final(x, at_read, grad=torch.is_grad_enabled()), acts

    @staticmethod
    def shared_prefix(first: Embedded, second: Embedded, read: Tensor) -> int:
        """The number of leading positions at which the two runs' block-0 inputs, rotary
        angles and attention masks are equal in every row (so is everything computed there:
        the model is causal), capped at the first read position."""
        same = (first.resid0 == second.resid0).all(-1).all(0)  # [pos]
        same &= (first.key_ok == second.key_ok).all(0)
        for a, b in ((first.cos, second.cos), (first.sin, second.sin)):
            if a is not None:
                assert b is not None  # both runs rotary
                same &= (a == b).all(-1).all(0)
        p0 = int(same.long().cumprod(0).sum())
        return min(p0, int(read.min()))

    def prefix(self, emb: Embedded, p0: int) -> Prefix | None:
        """Keys and values of positions ``:p0`` at every layer (no autograd), or None when
        ``p0`` is 0."""
        if p0 <= 0:
            return None
        head = emb.window(0, p0)
        ks, vs = [], []
        with torch.no_grad():
            x = head.resid0
            last = len(self.layers) - 1
            for layer, w in enumerate(self.layers):
                if layer == last:  # only its keys and values are needed
                    _, k, v = self._qkv(w, w.ln1(x), head)
                    ks.append(k)
                    vs.append(v)
                    break
                acts: list[LayerActs] = []
                x = blocks.block(w, x, self._attend(w, head, None, None, acts))
                ks.append(acts[0].k)
                vs.append(acts[0].v)
        return Prefix(p0, ks, vs)

    def _qkv(self, w: BareLayer, h: Tensor, emb: Embedded) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = blocks.project_qkv(w, h, self.a.n_heads, self.a.n_kv_heads, self.a.d_head)
        if self.rotary:
            assert emb.cos is not None and emb.sin is not None
            q = blocks.rotate(q, emb.cos, emb.sin)
            k = blocks.rotate(k, emb.cos, emb.sin)
        return q, k, v

    def _attend(self, w: BareLayer, emb: Embedded, kv_pre: tuple[Tensor, Tensor] | None,
                only: Tensor | None, acts: list[LayerActs]):
        """The attention of one block (``h -> output``, see :meth:`_attention`) that appends
        the layer's activations to ``acts``."""
        def attend(h: Tensor) -> Tensor:
            out, la = self._attention(w, h, emb, kv_pre, only)
            acts.append(la)
            return out
        return attend

    def _attention(self, w: BareLayer, h: Tensor, emb: Embedded,
                   kv_pre: tuple[Tensor, Tensor] | None,
                   only: Tensor | None) -> tuple[Tensor, LayerActs]:
        """The attention block's output and activations of query rows ``emb.q0``.. ;
        ``kv_pre``: the cached keys and values of the positions before; ``only`` [rows]: the
        output at that one row of each prompt ([rows, 1, d_model]), the activations at all."""
        r = h.shape[0]
        q, k, v = self._qkv(w, h, emb)
        ka, va = (k, v) if kv_pre is None else (torch.cat((kv_pre[0], k), 1),
                                                torch.cat((kv_pre[1], v), 1))
        kq, vq = blocks.per_query_head(ka, va, self.kv_map, self.a.n_heads)
        pattern = blocks.attention_pattern(q, kq, w.scale, self.allowed(emb)[:, None])
        z = blocks.mix(pattern, vq)  # [rows, pos, head, d_head]
        zo = z if only is None else z[torch.arange(r, device=z.device), only][:, None]
        out = blocks.project_out(w, zo)
        k_pre = None if kv_pre is None else kv_pre[0]
        return out, LayerActs(q, k, v, pattern, z, p0=emb.q0, k_pre=k_pre)

    @staticmethod
    def allowed(emb: Embedded) -> Tensor:
        """[rows, query_pos, key_pos]: may query i attend to key j (causal and padding), for
        the query rows ``emb.q0``.. and every key."""
        p = emb.key_ok.shape[1]
        return blocks.allowed(emb.key_ok, torch.arange(emb.q0, p, device=emb.key_ok.device))

    def check(self, tokens: Tensor, attention_mask: Tensor | None, readout) -> str | None:
        """None when this forward reproduces the bridge's readout of ``tokens`` (≤1e-4),
        else the reason it cannot be used."""
        def compute() -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                want = self.a.read(tokens, attention_mask, readout).float()
                got, _ = self.run(self.embed(tokens, attention_mask), readout)
            return got, want

        return blocks.check_forward(
            [(None, compute)],
            lambda _, diff: f"hook-free forward differs from the bridge (max |diff| {diff})",
            self.a.dtype)


def checked_grad_forward(a: Adapter, prompts: PromptSet, readout
                         ) -> tuple[GradForward | None, str | None]:
    """(a GradForward that reproduces the bridge's readout, None) or (None, why not).

    Checked once per set of weights, readout kind and padding: the check's outcome (which norms
    passed, or why none did) is plain data shared by every Adapter of the model; the forward
    itself (it holds the model) stays with the Adapter that built it, so another Adapter of the
    same model rebuilds it without checking again."""
    if readout.kind not in ("columns", "logits"):
        return None, f"the metric reads {readout.kind!r}, not logits at one position"
    if not a.is_causal:
        return None, "not a causal decoder"
    if not a._fast_readout_ok(prompts.tokens, prompts.attention_mask):
        return None, "the unembedding is not the plain final norm -> W_U"
    store = a._probe_store()  # emptied when the weights change
    key = ("grad_forward", readout.kind, prompts.attention_mask is not None)
    if key in store:
        return store[key]
    if key + ("checked",) in store:  # another Adapter of this model checked it
        native, reason = store[key + ("checked",)]
        store[key] = (GradForward(a, native_norms=native), None) if reason is None \
            else (None, reason)
        return store[key]
    gf, reason = _check_grad_forward(a, prompts, readout)
    store[key + ("checked",)] = (gf.native_norms if gf is not None else False, reason)
    store[key] = gf, reason
    return store[key]


def _check_grad_forward(a: Adapter, prompts: PromptSet, readout
                        ) -> tuple[GradForward | None, str | None]:
    # the first prompt and, under padding, the most padded one (its own mask)
    first = [0]
    if prompts.attention_mask is not None:
        first.append(int(prompts.attention_mask.sum(1).argmin()))
    idx = torch.tensor(sorted(set(first)))
    mask = None if prompts.attention_mask is None else prompts.attention_mask[idx]
    reason = None
    for native in (True, False):  # HF's fused norms if they reproduce the bridge, else its own
        try:
            gf = GradForward(a, native_norms=native)
        except ModelError as e:
            return None, str(e)
        reason = gf.check(prompts.tokens[idx], mask, readout.take(idx))
        if reason is None:
            return gf, None
        if native and not gf.native_norms:  # nothing was swapped: the same forward again
            break
    return None, reason
