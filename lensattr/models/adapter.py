"""The model adapter: the one object every stage talks to a ``TransformerBridge`` through.

Everything else in lensattr talks to a model through :class:`Adapter`, naming hook sites by
the :class:`Site` enum and heads by :class:`~lensattr.types.HeadId`. The adapter validates the
model, exposes its sizes and runs it with hooks; the rest lives in helpers it delegates to:
:mod:`.identity` (weights and config hashes, the probe store), :mod:`.readout` (reading only
what a metric asks for), :mod:`.weights` (weights as plain tensors), :mod:`.state` (what is
remembered per model, beside it: nothing is stored on the model object).
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor

from ..core.sites import Site, hook_name, is_layer_site
from ..core.types import HeadId
from . import identity, state, weights
from . import readout as readout_
from .errors import ModelError
from .hooks import HookFn, Hooks, after, wrap
from .weights import BareLayer, FinalNorm

__all__ = ["Adapter", "ModelError", "FinalNorm", "BareLayer", "after", "HookFn"]


class Adapter:
    """A thin, validated view of a ``TransformerBridge`` for lensattr's stages.

    It refuses models without per-head attention patterns, exposes the sizes later stages
    need, and runs the model with hooks that are attached only inside a context.
    """

    def __init__(self, model: Any, name: str | None = None):
        if isinstance(model, Adapter):
            model = model.model
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(model, "run_with_hooks"):
            raise ModelError(
                "model: expected a transformer_lens TransformerBridge (from lensattr.load_model "
                f"or TransformerBridge.boot_transformers), got {type(model).__name__}"
            )
        self.model: Any = model
        self.cfg: Any = cfg
        self.name: str = (
            name
            or state.loaded_name(model)
            or str(getattr(cfg, "model_name", None) or getattr(cfg, "architecture", "model"))
        )
        # probe results are kept beside the model (never on it), so each new Adapter does not
        # re-run them; they hold for one set of weights (see _probe_store and .state)
        self._probes = state.ProbeStore(model)
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
        return state.logits_meaningful(self.model)

    @property
    def pattern_editable(self) -> bool:
        """Do edits made in hook_pattern reach the head outputs? False where the bridge
        delegates attention to the HF module and fires hook_pattern after the fact (e.g. BERT).
        Probed once per set of weights: with every pattern of layer 0 zeroed, hook_z must be
        zero."""
        store = self._probe_store()
        if "pattern_editable" not in store:
            seen: dict[str, Tensor] = {}
            hooks: Hooks = {(Site.PATTERN, 0): torch.zeros_like,
                            (Site.Z, 0): lambda z: seen.update(z=z)}
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

    def one_device(self, what: str) -> None:
        """Refuse a model whose weights are spread over several devices (``device_map``):
        ``what`` (the engine, patching, AtP) keeps its tensors on one device."""
        devices = sorted({str(p.device) for p in self.model.parameters()})
        if len(devices) > 1:
            raise ModelError(
                f"model {self.name!r}: its weights are spread over {', '.join(devices)} "
                f"(device_map / n_devices); {what} needs the model on one device. Load it "
                "with device= (one GPU, or the CPU), or give every GPU a whole copy with "
                "torchrun: `torchrun --nproc-per-node N -m lensattr audit ...` puts rank r on "
                "cuda:r and shares the work")

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

    # ---- identity ----------------------------------------------------------------------
    def weights_hash(self) -> str:
        """sha256 (16 hex digits) of the weights bit for bit: every parameter's and buffer's
        name, shape, dtype and raw bytes. Recomputed on every call (0.4-1 s for the 540 MB of
        SmolLM2-135M on one CPU core), so in-place edits, also through ``.data``, always change
        it; the same whatever the number of torch threads. Device is left out: a model moved
        to another device keeps its hash."""
        return identity.weights_hash(self)

    def current_weights_hash(self) -> str:
        """:meth:`weights_hash`, reused while no parameter or buffer has been replaced or
        edited in place through autograd-visible ops (each tensor's ``data_ptr`` and
        ``_version``). Edits through ``.data`` bump no version counter: they are seen by the
        next full :meth:`weights_hash` (which every new Engine computes)."""
        return identity.current_weights_hash(self)

    def _probe_store(self) -> state.ProbeStore:
        """The model's probe results, emptied when its weights changed since they were made."""
        return identity.probe_store(self)

    def config_hash(self) -> str:
        """sha256 (16 hex digits) of the config, without the device (where the model runs
        does not change what it computes beyond rounding)."""
        return identity.config_hash(self.cfg)

    # ---- weights -----------------------------------------------------------------------
    def _stacked(self, name: str) -> Tensor | None:
        """The bridge's stacked weight ``name`` (W_Q, b_O, ...: [layer, ...]), detached, or
        None where the model has none. The bridge stacks every layer on each access, so it is
        kept (with the probes: dropped when the weights change)."""
        return weights.stacked_all(self)[name]

    def _stacked_all(self) -> dict[str, Tensor | None]:
        return weights.stacked_all(self)

    def W_O(self, layer: int) -> torch.Tensor:
        """Output weights of one layer: [head_index, d_head, d_model]."""
        return cast(Tensor, self._stacked("W_O"))[layer]  # every bridge has output weights

    def W_V(self, layer: int) -> torch.Tensor:
        """Value weights per *query* head (key/value heads repeated under grouped-query
        attention): [head_index, d_model, d_head]."""
        return weights.W_V(self, layer)

    def b_V(self, layer: int) -> torch.Tensor:
        """Value biases per query head, zeros for bias-free projections: [head_index, d_head]."""
        return weights.b_V(self, layer)

    def weight_processing(self) -> dict:
        """How the bridge's weights were processed, for ``meta``: TransformerLens's processing
        flags and whether value biases are still in b_V (folding moves them into b_O). Zero
        ablation keeps b_V, so both conventions give the same effects."""
        return weights.weight_processing(self)

    def ln1(self, layer: int) -> tuple[Tensor, Tensor]:
        """(weight, bias) of block ``layer``'s first norm, each [d_model] (bias zeros for
        RMSNorm). In a post-norm encoder (BERT) it is the norm after attention + residual."""
        return weights.ln1(self, layer)

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
        return weights.optional(lambda: self.model.blocks[layer].attn.b_O)

    def mlp_b_out(self, layer: int) -> Tensor | None:
        """The MLP's output bias [d_model], or None (bias-free, or no MLP)."""
        return weights.optional(lambda: self.model.blocks[layer].mlp.b_out)

    def unembed(self) -> tuple[Tensor, Tensor | None]:
        """(W_U [d_model, d_vocab], b_U [d_vocab] or None)."""
        return self.model.W_U.detach(), weights.optional(lambda: self.model.b_U)

    def final_norm(self) -> FinalNorm:
        """The final norm's kind and its (unfolded) weight and bias, as the bridge runs it:
        ``layernorm``: (x - mean(x)) / s * weight + bias; ``rmsnorm``: x / s * weight; s is
        ``ln_final.hook_scale`` (Site.LN_FINAL_SCALE)."""
        return weights.final_norm(self)

    def bare_layer(self, layer: int) -> BareLayer:
        """Block ``layer`` as plain tensors, its norms and its HF MLP module, for the
        hook-free forward of :mod:`lensattr.evidence.bare` (which checks it against the bridge
        before use). Raises ModelError for a block it cannot take apart."""
        return weights.bare_layer(self, layer)

    def patterns_from_cache(self, cache) -> list[Tensor]:
        """Attention patterns [batch, head_index, query_pos, key_pos] per layer from a TL
        ``ActivationCache`` (or a dict with the same keys), on the CPU like the claims."""
        return weights.patterns_from_cache(self, cache)

    # ---- running -----------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, hooks: Hooks) -> Iterator[None]:
        """Attach forward hooks for the duration of the context; always removed, also on error."""
        fwd = []
        for (site, layer), fn in hooks.items():
            fwd.append((hook_name(site, layer), wrap(fn)))
        with self.model.hooks(fwd_hooks=fwd):
            yield

    def forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        hooks: Hooks | None = None,
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
        hooks: Hooks | None = None,
    ) -> tuple[Tensor, dict[tuple[Site, int | None], Tensor]]:
        """Logits plus the activations at ``sites`` (every layer for layer sites), detached."""
        store: dict[tuple[Site, int | None], Tensor] = {}
        logits = self.forward(tokens, attention_mask, self.capture_hooks(sites, store, hooks))
        return logits, store

    def cache(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        sites: tuple[Site, ...] = (Site.PATTERN, Site.Z),
        hooks: Hooks | None = None,
    ) -> dict[tuple[Site, int | None], Tensor]:
        """The activations at ``sites`` (every layer for layer sites), detached, without the
        logits: the forward stops after the last block unless a site lies beyond it (the final
        norm), so no ``[batch, pos, d_vocab]`` tensor is made (:func:`.readout.cache`)."""
        return readout_.cache(self, tokens, attention_mask, sites, hooks)

    def capture_hooks(
        self,
        sites: tuple[Site, ...],
        store: dict,
        hooks: Hooks | None = None,
    ) -> Hooks:
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

    # ---- reading -----------------------------------------------------------------------
    def read(self, tokens: Tensor, attention_mask: Tensor | None, readout,
             hooks: Hooks | None = None) -> Tensor:
        """Compute only what a metric's readout asks for (:func:`.readout.read`)."""
        return readout_.read(self, tokens, attention_mask, readout, hooks)

    def read_final(self, resid: Tensor, readout, hooks=None, first_pos: int = 0,
                   grad: bool = False) -> Tensor:
        """The final norm and the unembedding a readout asks for (:func:`.readout.read_final`)."""
        return readout_.read_final(self, resid, readout, hooks, first_pos, grad)

    def read_grad(self, tokens: Tensor, attention_mask: Tensor | None, readout,
                  hooks: Hooks | None = None) -> Tensor:
        """The readout with autograd on (:func:`.readout.read_grad`)."""
        return readout_.read_grad(self, tokens, attention_mask, readout, hooks)

    def _capture(self, tokens, attention_mask, hooks, key) -> Tensor:
        """Run until the hook at ``key`` fires, return its value (:func:`.readout.capture`)."""
        return readout_.capture(self, tokens, attention_mask, hooks, key)

    def _fast_readout_ok(self, tokens, attention_mask) -> bool:
        return readout_.fast_readout_ok(self, tokens, attention_mask)
