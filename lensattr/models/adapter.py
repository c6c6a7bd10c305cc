"""The model adapter: the ONLY module that knows TransformerLens hook names and weights.

Everything else in lensattr talks to a model through :class:`Adapter`, naming hook sites by
the :class:`Site` enum and heads by :class:`~lensattr.types.HeadId`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.sites import Site, hook_name, is_layer_site
from ..core.types import HeadId
from .fused import fused_mlp

__all__ = ["Adapter", "ModelError", "FinalNorm", "BareLayer", "after"]


class ModelError(ValueError):
    """A model lensattr cannot handle, or a model name it cannot resolve."""


HookFn = Callable[[Tensor], Tensor | None]
_NOT_CONFIG = {"device", "n_devices"}  # config entries that say where, not what


class Adapter:
    """A thin, validated view of a ``TransformerBridge`` for lensattr's stages.

    It refuses models without per-head attention patterns, exposes the sizes later stages
    need, and runs the model with hooks that are attached only inside a context.
    """

    def __init__(self, model, name: str | None = None):
        if isinstance(model, Adapter):
            model = model.model
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(model, "run_with_hooks"):
            raise ModelError(
                "model: expected a transformer_lens TransformerBridge (from lensattr.load_model "
                f"or TransformerBridge.boot_transformers), got {type(model).__name__}"
            )
        self.model = model
        self.cfg = cfg
        self.name = (
            name
            or getattr(model, "_lensattr_name", None)
            or str(getattr(cfg, "model_name", None) or getattr(cfg, "architecture", "model"))
        )
        # probe results are kept on the model, so each new Adapter does not re-run them; they
        # hold for one set of weights (see _probe_store)
        if not isinstance(getattr(model, "_lensattr_probes", None), dict):
            model._lensattr_probes = {}
        self._probes: dict = model._lensattr_probes
        hooks = set(model.hook_dict.keys())
        missing = [
            hook_name(s, layer)
            for layer in range(self.n_layers)
            for s in (Site.Z, Site.PATTERN)
            if hook_name(s, layer) not in hooks
        ]
        if missing:
            raise ModelError(
                f"model {self.name!r} exposes no per-head attention patterns (missing hooks such "
                f"as {missing[:2]}); lensattr needs eager attention with hook_pattern and hook_z"
            )

    # ---- sizes -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def d_head(self) -> int:
        return int(self.cfg.d_head)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(self.cfg.d_vocab)

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads (fewer than n_heads under grouped-query attention)."""
        return int(getattr(self.cfg, "n_key_value_heads", None) or self.n_heads)

    def kv_head(self, head: int) -> int:
        """The key/value head that query head ``head`` reads (grouped-query attention)."""
        return head // (self.n_heads // self.n_kv_heads)

    @property
    def is_causal(self) -> bool:
        return getattr(self.cfg, "attention_dir", "causal") == "causal"

    @property
    def logits_meaningful(self) -> bool:
        """False for encoders shipped without a trained output head (e.g. ``minilm``)."""
        return bool(getattr(self.model, "_lensattr_logits_meaningful", True))

    @property
    def pattern_editable(self) -> bool:
        """Do edits made in hook_pattern reach the head outputs? False where the bridge
        delegates attention to the HF module and fires hook_pattern after the fact (e.g. BERT).
        Probed once per set of weights: with every pattern of layer 0 zeroed, hook_z must be
        zero."""
        store = self._probe_store()
        if "pattern_editable" not in store:
            seen = {}
            hooks = {(Site.PATTERN, 0): torch.zeros_like, (Site.Z, 0): lambda z: seen.update(z=z)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TL warns when the edit is discarded
                self.forward(torch.zeros(1, 2, dtype=torch.long, device=self.device),
                             hooks=hooks)
            store["pattern_editable"] = bool((seen["z"] == 0).all())
        return store["pattern_editable"]

    @property
    def has_direct_path(self) -> bool:
        """True when the final residual is the plain sum of every component's output, read
        through one final norm (pre-norm decoders). Post-norm encoders (BERT) are not."""
        return self.is_causal

    @property
    def device(self) -> torch.device:
        """The device of the model's weights: where the engine makes its tensors."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the model's weights."""
        floats = (p.dtype for p in self.model.parameters() if p.dtype.is_floating_point)
        return next(floats, torch.get_default_dtype())

    def heads(self) -> list[HeadId]:
        return [HeadId(layer, h) for layer in range(self.n_layers) for h in range(self.n_heads)]

    def check_head(self, head, arg: str = "head") -> HeadId:
        """Validate a head address and return it as a HeadId; clear error naming ``arg``."""
        try:
            if len(head) != 2:
                raise ValueError
            layer, h = (operator.index(head[0]), operator.index(head[1]))
        except (TypeError, ValueError, IndexError):
            raise ValueError(
                f"{arg}: expected HeadId(layer, head) with two integers, got {head!r}"
            ) from None
        if not 0 <= layer < self.n_layers:
            raise ValueError(
                f"{arg}: layer {layer} out of range; model {self.name!r} has layers "
                f"0..{self.n_layers - 1}"
            )
        if not 0 <= h < self.n_heads:
            raise ValueError(
                f"{arg}: head {h} out of range; model {self.name!r} has heads 0..{self.n_heads - 1}"
            )
        return HeadId(layer, h)

    def weights_hash(self) -> str:
        """sha256 (16 hex digits) of the weights bit for bit: every parameter's and buffer's
        name, shape, dtype and raw bytes. Recomputed on every call (0.4-1 s for the 540 MB of
        SmolLM2-135M on one CPU core), so in-place edits, also through ``.data``, always change
        it; the same whatever the number of torch threads. Device is left out: a model moved
        to another device keeps its hash."""
        h = hashlib.sha256()
        with torch.no_grad():
            for kind, name, t in self._weight_tensors():
                t = t.detach()
                h.update(f"{kind}|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
                flat = t.cpu().contiguous().reshape(-1)
                if flat.numel():
                    h.update(memoryview(flat.view(torch.uint8).numpy()))
        value = h.hexdigest()[:16]
        self._probes["_weights_memo"] = (self._weights_version(), value)
        return value

    def current_weights_hash(self) -> str:
        """:meth:`weights_hash`, reused while no parameter or buffer has been replaced or
        edited in place through autograd-visible ops (each tensor's ``data_ptr`` and
        ``_version``). Edits through ``.data`` bump no version counter: they are seen by the
        next full :meth:`weights_hash` (which every new Engine computes)."""
        memo = self._probes.get("_weights_memo")
        if memo is not None and memo[0] == self._weights_version():
            return memo[1]
        return self.weights_hash()

    def _weight_tensors(self):
        for name, p in self.model.named_parameters():
            yield "param", name, p
        for name, b in self.model.named_buffers():
            yield "buffer", name, b

    def _weights_version(self) -> tuple:
        return tuple(
            (name, t.data_ptr(), t._version, tuple(t.shape), t.dtype, str(t.device))
            for _, name, t in self._weight_tensors()
        )

    def _probe_store(self) -> dict:
        """The model's probe results, emptied when its weights changed since they were made."""
        h = self.current_weights_hash()
        if self._probes.get("_weights") != h:
            memo = self._probes.get("_weights_memo")
            self._probes.clear()
            self._probes.update({"_weights": h, "_weights_memo": memo})
        return self._probes

    def config_hash(self) -> str:
        """sha256 (16 hex digits) of the config, without the device (where the model runs
        does not change what it computes beyond rounding)."""
        d = {k: repr(v) for k, v in sorted(vars(self.cfg).items()) if k not in _NOT_CONFIG}
        return hashlib.sha256(json.dumps(d).encode()).hexdigest()[:16]

    # ---- weights -----------------------------------------------------------------------
    def _stacked(self, name: str) -> Tensor | None:
        """The bridge's stacked weight ``name`` (W_Q, b_O, ...: [layer, ...]), detached, or
        None where the model has none. The bridge stacks every layer on each access, so it is
        kept (with the probes: dropped when the weights change)."""
        return self._stacked_all()[name]

    def _stacked_all(self) -> dict[str, Tensor | None]:
        store = self._probe_store()
        if "_stacked" not in store:
            store["_stacked"] = {
                name: _optional(lambda name=name: getattr(self.model, name))
                for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")}
        return store["_stacked"]

    def W_O(self, layer: int) -> torch.Tensor:
        """Output weights of one layer: [head_index, d_head, d_model]."""
        return self._stacked("W_O")[layer]

    def W_V(self, layer: int) -> torch.Tensor:
        """Value weights per *query* head (key/value heads repeated under grouped-query
        attention): [head_index, d_model, d_head]."""
        w = self.model.W_V[layer].detach()  # [kv_head_index, d_model, d_head]
        return w.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    def b_V(self, layer: int) -> torch.Tensor:
        """Value biases per query head, zeros for bias-free projections: [head_index, d_head]."""
        try:
            b = self.model.b_V[layer].detach()  # [kv_head_index, d_head]
        except AttributeError:  # TL raises for bias-free checkpoints (Llama)
            return torch.zeros(self.n_heads, self.d_head, device=self.device, dtype=self.dtype)
        return b.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    def weight_processing(self) -> dict:
        """How the bridge's weights were processed, for ``meta``: TransformerLens's processing
        flags and whether value biases are still in b_V (folding moves them into b_O). Zero
        ablation keeps b_V, so both conventions give the same effects."""
        m = self.model
        has_bv = any(bool(self.b_V(i).any()) for i in range(self.n_layers))
        return {"weights_processed": bool(getattr(m, "_weights_processed", False)),
                "compatibility_mode": bool(getattr(m, "compatibility_mode", False)),
                "value_bias_in_b_V": has_bv,
                "zero_ablation": "z := b_V (the attention-independent part b_V @ W_O is kept; "
                "edge edits remove or replace alpha_s (v_s - b_V)), the same numbers whether "
                "or not value biases are folded into b_O"}

    def ln1(self, layer: int) -> tuple[Tensor, Tensor]:
        """(weight, bias) of block ``layer``'s first norm, each [d_model] (bias zeros for
        RMSNorm). In a post-norm encoder (BERT) it is the norm after attention + residual."""
        ln = self.model.blocks[layer].ln1
        w = getattr(ln, "weight", None)
        w = torch.ones(self.d_model, device=self.device) if w is None else w.detach()
        b = getattr(ln, "bias", None)
        b = torch.zeros_like(w) if b is None else b.detach()
        return w, b

    @property
    def post_norm(self) -> bool:
        """True for post-norm encoders (BERT: norm after attention + residual), False for
        pre-norm decoders (norm inside each block's input)."""
        return not self.is_causal

    def circuits(self):
        """TransformerLens's factored per-head circuits (QK, OV), each a ``FactoredMatrix``
        [layer, head_index, d_model, d_model], key/value heads repeated under GQA."""
        return self.model.QK, self.model.OV

    def composition_scores(self, mode: str) -> Tensor:
        """TransformerLens's ``all_composition_scores(mode)``: [layer, head, layer, head]."""
        return self.model.all_composition_scores(mode).scores.detach()

    def embed_unembed(self) -> tuple[Tensor, Tensor]:
        """(W_E [d_vocab, d_model], W_U [d_model, d_vocab])."""
        return self.model.W_E.detach(), self.model.W_U.detach()

    def b_O(self, layer: int) -> Tensor | None:
        """Attention output bias of one layer [d_model] (shared by its heads), or None."""
        return _optional(lambda: self.model.blocks[layer].attn.b_O)

    def mlp_b_out(self, layer: int) -> Tensor | None:
        """The MLP's output bias [d_model], or None (bias-free, or no MLP)."""
        return _optional(lambda: self.model.blocks[layer].mlp.b_out)

    def unembed(self) -> tuple[Tensor, Tensor | None]:
        """(W_U [d_model, d_vocab], b_U [d_vocab] or None)."""
        return self.model.W_U.detach(), _optional(lambda: self.model.b_U)

    def final_norm(self) -> FinalNorm:
        """The final norm's kind and its (unfolded) weight and bias, as the bridge runs it:
        ``layernorm``: (x - mean(x)) / s * weight + bias; ``rmsnorm``: x / s * weight; s is
        ``ln_final.hook_scale`` (Site.LN_FINAL_SCALE)."""
        kind = str(getattr(self.cfg, "normalization_type", None) or "")
        ln = getattr(self.model, "ln_final", None)
        weight = _optional(lambda: ln.weight) if ln is not None else None
        if kind not in ("LN", "RMS") or weight is None:
            raise ModelError(
                f"model {self.name!r}: final norm of type {kind or 'none'!r}; the direct path "
                "needs a LayerNorm or RMSNorm with a weight (ln_final)"
            )
        bias = _optional(lambda: ln.bias) if kind == "LN" else None
        return FinalNorm("layernorm" if kind == "LN" else "rmsnorm", weight, bias)

    def bare_layer(self, layer: int) -> BareLayer:
        """Block ``layer`` as plain tensors, its norms and its HF MLP module, for the
        hook-free forward of :mod:`lensattr.evidence.bare` (which checks it against the bridge
        before use). Raises ModelError for a block it cannot take apart."""
        block = self.model.blocks[layer]
        try:  # the bridge's norms (their arithmetic, e.g. TL's own LayerNorm), HF's MLP
            ln1, ln2 = block.ln1, block.ln2
            mlp = fused_mlp(block.mlp.original_component)
            hf_attn = block.attn.original_component
        except AttributeError as e:
            raise ModelError(f"model {self.name!r}: block {layer} has no HF submodules") from e
        scale = getattr(hf_attn, "scaling", None)
        if scale is None:  # GPT-2 keeps flags instead of a scale
            scale = self.d_head ** -0.5 if getattr(hf_attn, "scale_attn_weights", True) else 1.0
            if getattr(hf_attn, "scale_attn_by_inverse_layer_idx", False):
                scale = scale / float(layer + 1)
        stacked = self._stacked_all()

        def get(name, shape=None):
            b = stacked[name]
            if b is None:
                return torch.zeros(shape, device=self.device, dtype=self.dtype)
            return b[layer]

        kvh = self.n_kv_heads
        W_Q, W_K, W_V, W_O = get("W_Q"), get("W_K"), get("W_V"), get("W_O")
        b_Q, b_K = get("b_Q", (self.n_heads, self.d_head)), get("b_K", (kvh, self.d_head))
        b_V = get("b_V", (kvh, self.d_head))

        def flat(W):  # [head, d_model, d_head] -> [d_model, head * d_head]
            return W.permute(1, 0, 2).reshape(W.shape[1], -1)

        return BareLayer(
            ln1=ln1, ln2=ln2, mlp=mlp,
            W_Q=W_Q, b_Q=b_Q, W_K=W_K, b_K=b_K, W_V=W_V, b_V=b_V,
            W_O=W_O, b_O=get("b_O", (self.d_model,)),
            scale=float(scale),
            parallel=bool(getattr(self.cfg, "parallel_attn_mlp", False)),
            rotary=getattr(self.cfg, "positional_embedding_type", "") == "rotary",
            W_QKV=torch.cat((flat(W_Q), flat(W_K), flat(W_V)), dim=1),
            b_QKV=torch.cat((b_Q.reshape(-1), b_K.reshape(-1), b_V.reshape(-1))),
            W_O_flat=W_O.reshape(-1, W_O.shape[-1]),
        )

    def patterns_from_cache(self, cache) -> list[Tensor]:
        """Attention patterns [batch, head_index, query_pos, key_pos] per layer from a TL
        ``ActivationCache`` (or a dict with the same keys), on the CPU like the claims."""
        out = []
        for layer in range(self.n_layers):
            name = hook_name(Site.PATTERN, layer)
            try:
                out.append(cache[name].detach().cpu())
            except KeyError:
                raise ValueError(
                    f"cache: has no attention pattern {name!r}; run the model with "
                    "run_with_cache on the audit's prompts"
                ) from None
        return out

    # ---- running -----------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, hooks: dict[tuple[Site, int | None], HookFn]) -> Iterator[None]:
        """Attach forward hooks for the duration of the context; always removed, also on error."""
        fwd = []
        for (site, layer), fn in hooks.items():
            fwd.append((hook_name(site, layer), _wrap(fn)))
        with self.model.hooks(fwd_hooks=fwd):
            yield

    def forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        hooks: dict[tuple[Site, int | None], HookFn] | None = None,
    ) -> Tensor:
        """Logits [batch, pos, d_vocab], with optional hooks attached for this call only."""
        kw = {} if attention_mask is None else {"attention_mask": attention_mask.to(self.device)}
        with torch.no_grad(), self.hooks(hooks or {}):
            return self.model(tokens.to(self.device), **kw)

    def run_with_cache(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        sites: tuple[Site, ...] = (Site.PATTERN, Site.Z),
        hooks: dict[tuple[Site, int | None], HookFn] | None = None,
    ) -> tuple[Tensor, dict[tuple[Site, int | None], Tensor]]:
        """Logits plus the activations at ``sites`` (every layer for layer sites), detached."""
        store: dict[tuple[Site, int | None], Tensor] = {}
        logits = self.forward(tokens, attention_mask, self.capture_hooks(sites, store, hooks))
        return logits, store

    def capture_hooks(
        self,
        sites: tuple[Site, ...],
        store: dict,
        hooks: dict[tuple[Site, int | None], HookFn] | None = None,
    ) -> dict[tuple[Site, int | None], HookFn]:
        """``hooks`` plus hooks that save a detached copy of each site (every layer for layer
        sites) into ``store``, after any hook already on that site."""
        all_hooks = dict(hooks or {})
        for site in sites:
            for layer in range(self.n_layers) if is_layer_site(site) else [None]:
                key = (site, layer)

                def save(x, _key=key):
                    store[_key] = x.detach().clone()

                all_hooks[key] = after(all_hooks.get(key), save)
        return all_hooks

    def read(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None,
        readout,
        hooks: dict[tuple[Site, int | None], HookFn] | None = None,
    ) -> Tensor:
        """Compute only what a metric's :class:`~lensattr.metrics.Readout` asks for.

        ``hidden``: the final hidden states [batch, pos, d_model] (output of the last block;
        the forward stops there). ``columns``: the final residual is captured before the final
        norm and the forward stops there; the norm is applied at the read positions only and
        just the requested unembedding columns are computed ([batch, k]). ``logits``: the full
        vocabulary at the read positions ([batch, d_vocab]). ``all_logits``: the ordinary
        forward. Falls back to the ordinary forward when this model's unembedding is not the
        plain ``ln_final -> W_U`` (checked once against a full forward).
        """
        if readout.kind == "hidden":
            return self._capture(tokens, attention_mask, hooks, (Site.BLOCK_OUT, self.n_layers - 1))
        if not self.logits_meaningful:
            raise ModelError(
                f"metric: model {self.name!r} has no trained output head (its logits mean "
                "nothing); use a metric that reads the final hidden states, e.g. "
                "lensattr.core.metrics.PairCosine or HiddenCosineToClean"
            )
        if readout.kind == "all_logits" or not self._fast_readout_ok(tokens, attention_mask):
            logits = self.forward(tokens, attention_mask, hooks)
            if readout.kind == "all_logits":
                return logits
            rows = torch.arange(logits.shape[0], device=logits.device)
            at = logits[rows, readout.positions.to(logits.device)]  # [batch, d_vocab]
            if readout.kind == "columns":
                return at.gather(1, readout.columns.to(at.device))
            return at
        resid = self._capture(tokens, attention_mask, hooks, (Site.RESID_FINAL, None))
        # the residual's own hooks already ran during the capture
        return self.read_final(resid, readout, hooks)

    def read_final(self, resid: Tensor, readout, hooks=None, first_pos: int = 0,
                   grad: bool = False) -> Tensor:
        """The final norm and the unembedding columns (or rows) a ``columns`` / ``logits``
        readout asks for, from the final residual ``resid`` [batch, pos, d_model] of positions
        ``first_pos`` onwards. The caller's hooks on the norm itself (e.g. a frozen scale) run.
        ``grad``: keep autograd on (gradient-based attribution)."""
        norm_hooks = {k: f for k, f in (hooks or {}).items()
                      if k[0] in (Site.LN_FINAL_SCALE, Site.LN_FINAL_OUT)}
        rows = torch.arange(resid.shape[0], device=resid.device)
        no_grad = contextlib.nullcontext() if grad else torch.no_grad()
        with no_grad, self.hooks(norm_hooks):
            normed = self.model.ln_final(resid)  # [batch, pos, d_model]; cheap next to W_U
            at = readout.positions.to(resid.device) - first_pos
            normed = normed[rows, at]  # [batch, d_model]
            W_U, b_U = self.model.W_U, self.model.b_U  # [d_model, d_vocab], [d_vocab]
            if readout.kind == "columns":
                cols = readout.columns.to(resid.device)  # [batch, k]
                w = W_U.T[cols]  # [batch, k, d_model]
                return torch.einsum("bkd,bd->bk", w, normed) + b_U[cols]
            return normed @ W_U + b_U

    def read_grad(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None,
        readout,
        hooks: dict[tuple[Site, int | None], HookFn] | None = None,
    ) -> Tensor:
        """:meth:`read` with autograd on, for gradient-based attribution: the same readout
        (final hidden states, the read unembedding columns or rows, or all logits), connected
        to the graph of every hooked activation."""
        kw = {} if attention_mask is None else {"attention_mask": attention_mask.to(self.device)}
        if readout.kind == "hidden":
            key = (Site.BLOCK_OUT, self.n_layers - 1)
        elif readout.kind != "all_logits" and self._fast_readout_ok(tokens, attention_mask):
            key = (Site.RESID_FINAL, None)
        else:
            key = None
        store: dict = {}
        all_hooks = dict(hooks or {})
        if key is not None:

            def grab(x):
                store["x"] = x
                raise _StopForward

            all_hooks[key] = after(all_hooks.get(key), grab)
        with torch.enable_grad(), self.hooks(all_hooks):
            try:
                store["logits"] = self.model(tokens.to(self.device), **kw)
            except _StopForward:
                pass
            if key is None:
                logits = store["logits"]
                if readout.kind == "all_logits":
                    return logits
                rows = torch.arange(logits.shape[0], device=logits.device)
                at = logits[rows, readout.positions.to(logits.device)]  # [batch, d_vocab]
                return at.gather(1, readout.columns.to(at.device)) if (
                    readout.kind == "columns") else at
            if readout.kind == "hidden":
                return store["x"]
        return self.read_final(store["x"], readout, hooks, grad=True)

    def _capture(self, tokens, attention_mask, hooks, key) -> Tensor:
        """Run until the hook at ``key`` fires (after any hook already there), return its
        value and stop the forward pass."""
        store = {}
        all_hooks = dict(hooks or {})

        def grab(x):
            store["x"] = x.detach()
            raise _StopForward

        all_hooks[key] = after(all_hooks.get(key), grab)
        try:
            self.forward(tokens, attention_mask, all_hooks)
        except _StopForward:
            pass
        return store["x"]

    def _fast_readout_ok(self, tokens, attention_mask) -> bool:
        store = self._probe_store()
        if "fast_readout" not in store:
            t = tokens[:1]
            m = None if attention_mask is None else attention_mask[:1]
            full = self.forward(t, m)[0]  # [pos, d_vocab]
            try:
                resid = self._capture(t, m, None, (Site.RESID_FINAL, None))
                with torch.no_grad():
                    fast = self.model.ln_final(resid) @ self.model.W_U + self.model.b_U
                ok = bool(torch.allclose(fast[0], full, atol=1e-4, rtol=1e-4))
            except Exception:  # no ln_final / W_U of the plain kind
                ok = False
            store["fast_readout"] = ok
        return store["fast_readout"]


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


def _optional(get) -> Tensor | None:
    """A weight that a model may lack (bias-free projections raise or give None)."""
    try:
        t = get()
    except (AttributeError, KeyError, IndexError):
        return None
    return None if t is None else t.detach()


def after(inner: HookFn | None, fn: Callable[[Tensor], None]) -> HookFn:
    """A hook that runs ``inner`` (the hook already on that site, if any), then ``fn`` on the
    activation it leaves (to save it, or to stop the forward), and passes that on."""

    def hook(x):
        if inner is not None:
            out = inner(x)
            x = x if out is None else out
        fn(x)
        return x

    return hook


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early (hooks are removed by the context)."""


def _wrap(fn: HookFn):
    def hook(tensor, hook=None):  # TransformerLens passes the HookPoint as ``hook``
        return fn(tensor)

    return hook
