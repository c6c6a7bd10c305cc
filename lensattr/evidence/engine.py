"""The batched intervention engine.

Many interventions run in one forward pass by stacking copies of the prompt batch along the
batch dimension (row ``r = k * n_prompts + i`` is intervention ``k`` on prompt ``i``) and letting
each hook edit only its own rows, with masks. Hooks live only inside the adapter's context.

Identity: every result is keyed by the intervention's digest (what it does) within a run key
(model config and weights, prompts, metric, engine parameters), in memory and in the optional
checkpoint file, so a result is never handed back for another intervention that happens to
carry the same label (:mod:`.checkpoint`). An interrupted sweep resumes where it stopped.

Devices: reference activations, masks and accumulators live on the model's device; results
(metric values, head deltas, the public reference tensors the claims read) come back on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..core.metric import Metric, MetricError, check_metric_output
from ..core.metrics import as_metric
from ..core.prompts import PromptSet
from ..core.sites import Site
from ..core.types import AblationMethod
from ..models.adapter import Adapter, ModelError
from .bare import BARE_SITES, BareForward
from .checkpoint import EvidenceStore
from .hooks import METHOD_CODE, HookBuilders, pattern_hook
from .interventions import Intervention, digest
from .memory import position_bytes
from .run_identity import metric_identity, prompts_digest

__all__ = ["Engine", "EngineResult", "ENGINE_SEMANTICS"]

# bump when the numbers the engine computes for one intervention change meaning: saved
# results of an older definition are then not reused
ENGINE_SEMANTICS = 2  # 2: zero baseline keeps b_V (value bias)
# tensors assembled here before one move to the model's device, and every result: named
# explicitly, so a default device set by the user (torch.set_default_device) changes nothing
_CPU = torch.device("cpu")


@dataclass
class EngineResult:
    """Per-prompt metric values of each intervention.

    values: ``[intervention, batch]`` metric on each prompt (NaN where an intervention was not
        computable, e.g. renormalised knockout with no mass left).
    head_delta: ``[intervention, batch, layer, head_index]`` norm of the change of every head's
        output (z @ W_O) at the metric's read position, or None when not tracked.
    digests: each intervention's :meth:`~.Intervention.digest` (what keyed its result).
    n_reused: how many results came from the cache or checkpoint instead of a forward pass.
    All tensors are on the CPU.
    """

    labels: list[str]
    values: Float[Tensor, "intervention batch"]
    head_delta: Float[Tensor, "intervention batch layer head_index"] | None = None
    digests: list[str] = field(default_factory=list)
    n_reused: int = 0

    def __getitem__(self, label: str) -> Tensor:
        return self.values[self.labels.index(label)]


class Engine(HookBuilders):
    """Clean and corrupted reference runs plus batched interventions for one prompt set.

    ``checkpoint``: a safetensors file; results are saved there after every chunk and reused
    by a later engine of the same run key (see the module docstring). ``run_parts`` holds the
    run key's components and ``run_key`` their digest.
    """

    def __init__(
        self,
        model,
        prompts: PromptSet,
        metric,
        *,
        batch_size: int = 64,
        progress: bool = True,
        checkpoint: str | Path | None = None,
        fast: bool = True,
        memory_budget: int | None = None,
    ):
        self.adapter = model if isinstance(model, Adapter) else Adapter(model)
        self.prompts = prompts
        self.metric: Metric = as_metric(metric)
        prompts.validate_vocab(self.adapter.d_vocab)
        prompts.validate_length(getattr(self.adapter.cfg, "n_ctx", None))
        prompts.validate_tokenizer(getattr(self.adapter.model, "tokenizer", None),
                                   self.adapter.name)
        self.readout = self.metric.readout(prompts)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.memory_budget = None if memory_budget is None else int(memory_budget)
        self.progress = progress
        self.bar = None  # an outside progress bar (e.g. the audit's) that run() advances
        a, n = self.adapter, len(prompts)
        self.device = a.device
        self.weights_hash = a.weights_hash()  # bit for bit, computed afresh
        self._editable = a.pattern_editable
        self.W_O = [a.W_O(layer) for layer in range(a.n_layers)]  # [head, d_head, d_model]
        # z, v, final_scale, z_mean, z_corr: on the model's device; patterns: on the CPU
        self.clean_values, self.z, self.patterns = self._reference(prompts.tokens)
        self.clean = self._metric(self.clean_values, prompts, self.clean_values)
        self.z_mean = [self._masked_mean(z) for z in self.z]  # [pos, head, d_head]
        self.z_corr = self.patterns_corr = self.v_corr = self.corrupted = None
        if prompts.corrupted is not None:
            cv, self.z_corr, self.patterns_corr = self._reference(prompts.corrupted)
            self.corrupted = self._metric(cv, prompts.corrupted_view(), self.clean_values)
        self._edge_mean: dict[int, Tensor] = {}
        self._bias_v: dict[int, Tensor] = {}
        rows = torch.arange(n, device=_CPU)
        pos = self._read_pos(self.readout)
        self.out_clean = [  # [batch, head, d_model] each head's output at the read position (CPU)
            torch.einsum("bhd,hdm->bhm", z[rows, pos], w).cpu()
            for z, w in zip(self.z, self.W_O, strict=True)
        ]
        self.run_parts = {
            "config": a.config_hash(),
            "weights": self.weights_hash,
            "prompts": prompts_digest(prompts),
            "metric": digest(metric_identity(self.metric)),
            "engine": digest(self._engine_params()),
        }
        self._store = EvidenceStore(self.run_parts, checkpoint)
        self.run_key = self._store.run_key
        self._bare: BareForward | None = None
        self.fast_reason = "fast=False" if not fast else None
        if fast:
            self._bare, self.fast_reason = self._make_bare()
        self.n_rows = {"bare": 0, "bridge": 0}  # rows computed on each path
        # forward work done, in clean forward passes of one prompt (layers x positions run)
        self.work = 0.0
        self._bytes_per_position = position_bytes(a, self.prompts.n_pos)
        if self.memory_budget is not None and self.memory_budget < self._bytes_per_position * (
                1 if self.fast else self.prompts.n_pos):
            need = self._bytes_per_position * (1 if self.fast else self.prompts.n_pos)
            raise ValueError(
                f"memory_budget: {self.memory_budget} bytes cannot hold one row of this model "
                f"and prompts (about {need} bytes); raise it or leave it unset")

    def _make_bare(self) -> tuple[BareForward | None, str | None]:
        """The hook-free forward, where it reproduces the bridge's clean readout."""
        a = self.adapter
        if self.readout.kind not in ("columns", "logits"):
            return None, f"the metric reads {self.readout.kind!r}, not logits at one position"
        if not a.is_causal:
            return None, "not a causal decoder"
        if not a._fast_readout_ok(self.prompts.tokens, self.prompts.attention_mask):
            return None, "the unembedding is not the plain final norm -> W_U"
        try:
            bare = BareForward(a, self.prompts.tokens, self.prompts.attention_mask, self.readout)
        except ModelError as e:
            return None, str(e)
        first = int(self._read_pos(self.readout).min())
        if not bare.check(self.clean_values, first):
            return None, bare.reason
        return bare, None

    @property
    def fast(self) -> bool:
        """True when interventions run on the hook-free forward (see ``fast_reason``)."""
        return self._bare is not None

    def _engine_params(self) -> dict:
        """Every engine setting that changes the numbers of an intervention (batch size and
        device change only rounding and are left out). Add new value-changing settings here."""
        return {"semantics": ENGINE_SEMANTICS}

    @property
    def checkpoint_reason(self) -> str | None:
        """Why the checkpoint file gave no saved result, when it gave none (else None)."""
        return self._store.reason

    # ---- reference runs ----------------------------------------------------------------
    def _reference(self, tokens):
        """Readout, hook_z, patterns and values of a run without interventions; on the clean
        tokens also the final norm's scale (for direct paths)."""
        a, store = self.adapter, {}
        clean = tokens is self.prompts.tokens
        sites = (Site.Z, Site.PATTERN, Site.V) + ((Site.LN_FINAL_SCALE,) if clean else ())
        hooks = a.capture_hooks(sites, store)
        mask = self.prompts.attention_mask if clean else self.prompts.corrupted_attention_mask
        values = a.read(tokens, mask, self.readout, hooks)
        layers = range(a.n_layers)
        v = [store[(Site.V, layer)] for layer in layers]  # [batch, pos, kv_head, d_head]
        if clean:
            self.v = v
            self.final_scale = store.get((Site.LN_FINAL_SCALE, None))  # [batch, pos, 1]
        else:
            self.v_corr = v
        z = [store[(Site.Z, layer)] for layer in layers]
        return values, z, [store[(Site.PATTERN, layer)].cpu() for layer in layers]

    def _masked_mean(self, z: Tensor) -> Tensor:
        v = self.prompts.valid.to(z.device, z.dtype)[:, :, None, None]  # [batch, pos, 1, 1]
        return (z * v).sum(0) / v.sum(0).clamp(min=1)

    def _read_pos(self, readout) -> Tensor:
        if readout.positions is not None:
            return readout.positions
        return self.prompts.roles["END"]

    def _metric(self, values, prompts: PromptSet, clean, invalid: Tensor | None = None
                ) -> Tensor:
        """The metric per row (on the CPU), after checking the readout; rows marked ``invalid``
        (edits that could not be made) are NaN and exempt from the checks. The metric computes
        on the readout's device."""
        n = values.shape[0]
        invalid = (torch.zeros(n, dtype=torch.bool, device=values.device) if invalid is None
                   else invalid.to(values.device))
        values = values.float()
        if (~torch.isfinite(values.reshape(n, -1)).all(1) & ~invalid).any():
            raise MetricError(
                "model output: NaN or inf in the logits read by the metric; check the model's "
                "weights, inputs and interventions"
            )
        values[invalid] = 0.0
        out = check_metric_output(self.metric.compute(values, prompts, clean), n,
                                  self.metric.name).detach().cpu().clone()
        invalid = invalid.cpu()
        if not torch.isfinite(out[~invalid]).all():
            raise MetricError(f"metric {self.metric.name!r}: returned NaN or inf")
        out[invalid] = float("nan")
        return out

    # ---- interventions -----------------------------------------------------------------
    def validate(self, iv: Intervention) -> None:
        n, p = len(self.prompts), self.prompts.n_pos
        for h in iv.direct:
            self.adapter.check_head(h, "head")
            if self.final_scale is None:
                raise ValueError("direct: this model's final norm exposes no scale to freeze")
        if iv.direct:
            self._check_method(iv.direct_baseline, "direct_baseline")
        for ab in iv.ablations:
            self.adapter.check_head(ab.head, "head")
            self._check_method(ab.method, "method")
            if ab.rows is not None and ab.rows.shape != (n, p):
                raise ValueError(
                    f"rows: expected shape {(n, p)} [batch, pos], got {tuple(ab.rows.shape)}"
                )
        if iv.edges and not self._editable:
            first = min(e.head.layer for e in iv.edges)
            upstream = [x.head.layer for x in iv.ablations if x.head.layer < first]
            upstream += [h.layer for h in iv.direct]
            if upstream or len({e.head.layer for e in iv.edges}) > 1:
                raise ValueError(
                    f"interventions: {iv.label!r} combines edge edits with edits in other "
                    f"layers; on model {self.adapter.name!r} attention is computed inside the "
                    "HF module (hook_pattern edits are discarded), so edge edits are applied "
                    "through hook_z with the clean pattern and need an unchanged upstream"
                )
        for e in iv.edges:
            self.adapter.check_head(e.head, "head")
            self._check_method(e.baseline, "baseline")
            if e.remove.shape != (n, p, p):
                raise ValueError(
                    f"remove: expected shape {(n, p, p)} [batch, query_pos, key_pos], got "
                    f"{tuple(e.remove.shape)}"
                )

    def _check_method(self, method: AblationMethod, arg: str) -> None:
        if method == AblationMethod.RESAMPLE and self.z_corr is None:
            raise ValueError(f"{arg}: resample ablation needs corrupted prompts in the task")
        if method == AblationMethod.MEAN and not self.prompts.aligned:
            raise ValueError(
                f"{arg}: mean ablation averages each position over the prompts, which needs "
                "aligned prompts (one length, no padding, every role at one position); these "
                "prompts are not aligned: use zero or resample"
            )

    def run(
        self,
        interventions: list[Intervention],
        *,
        track_heads: bool = False,
        desc: str = "interventions",
    ) -> EngineResult:
        """Per-prompt metric values of each intervention. Results are keyed by digest: one
        already computed in this run (in memory or in the checkpoint) is reused, and two
        interventions that do the same thing under other labels are computed once."""
        self._check_weights()
        self._editable = self.adapter.pattern_editable
        for iv in interventions:
            self.validate(iv)
        labels = [iv.label for iv in interventions]
        if len(set(labels)) != len(labels):
            raise ValueError("interventions: labels must be unique")
        keys = [iv.digest() for iv in interventions]
        n = len(self.prompts)
        a = self.adapter
        todo: dict[str, int] = {}  # digest -> the first intervention that has it
        for k, key in enumerate(keys):
            if self._store.get(key, track_heads) is None:
                todo.setdefault(key, k)
        order = sorted(todo.values(), key=lambda k: self._reach(interventions[k]))
        own = self.bar is None
        bar = self.bar if not own else tqdm(
            total=len(order), desc=desc, disable=not self.progress or not order, leave=False
        )
        if not own:
            bar.update(len(interventions) - len(order))  # reused from memory or checkpoint
        for ks in self._chunks(interventions, order):
            v, d = self._run_chunk([interventions[k] for k in ks], track_heads)
            for j, k in enumerate(ks):
                self._store.put(keys[k], v[j], d[j] if track_heads else None)
            self._store.save()
            bar.update(len(ks))
        if own:
            bar.close()
        values = torch.full((len(interventions), n), float("nan"), device=_CPU)
        delta = (torch.zeros(len(interventions), n, a.n_layers, a.n_heads, device=_CPU)
                 if track_heads else None)
        for k, key in enumerate(keys):
            v, d = self._store.get(key, track_heads)
            values[k] = v
            if track_heads:
                delta[k] = d
        reused = sum(1 for k, key in enumerate(keys) if todo.get(key) != k)
        return EngineResult(labels, values, delta, keys, reused)

    def _check_weights(self) -> None:
        now = self.adapter.current_weights_hash()
        if now != self.weights_hash:
            raise ModelError(
                f"model: its weights changed after this Engine was built (weights hash "
                f"{self.weights_hash} -> {now}); its reference runs are stale, build a new Engine"
            )

    def _chunks(self, ivs: list[Intervention], order: list[int]) -> list[list[int]]:
        """Interventions to run together, within ``memory_budget``. On the bridge:
        ``batch_size`` rows per chunk. On the hook-free forward: interventions of one reach
        (first layer, first position) together, as many as ``batch_size`` full-length rows'
        worth of positions (an edit of the read row alone costs one position per row)."""
        n, p = len(self.prompts), self.prompts.n_pos
        if self._bare is None:
            per = max(1, min(self.batch_size, self._budget_positions() // p) // n)
            return [order[i : i + per] for i in range(0, len(order), per)]
        out: list[list[int]] = []
        last = None
        for k in order:
            reach = self._reach(ivs[k])
            q = p - min(reach[1], p - 1)  # positions each row runs
            per = max(1, min(self.batch_size * p, self._budget_positions()) // (q * n))
            if reach != last or len(out[-1]) >= per:
                out.append([])
            out[-1].append(k)
            last = reach
        return out

    def _budget_positions(self) -> int:
        """How many (row, position) pairs of the hook-free forward fit ``memory_budget``."""
        if self.memory_budget is None:
            return 1 << 62
        return self.memory_budget // self._bytes_per_position

    def _reach(self, iv: Intervention) -> tuple[int, int]:
        """(first layer, first query position) that ``iv`` edits: nothing before either can
        change in a causal model. Direct paths edit only the final residual; the read
        positions are always included."""
        a, first = self.adapter, int(self._read_pos(self.readout).min())
        layer = min(iv.layers(), default=a.n_layers)
        for ab in iv.ablations:
            if ab.rows is None:
                return layer, 0
            hit = ab.rows.any(0).nonzero()
            first = min(first, int(hit[0]) if len(hit) else first)
        for e in iv.edges:
            hit = e.remove.any(0).any(-1).nonzero()  # query positions with a removed edge
            first = min(first, int(hit[0]) if len(hit) else first)
        return layer, first

    def _run_chunk(self, ivs: list[Intervention], track: bool):
        """One forward pass for ``ivs``: on the hook-free forward from the first edited layer
        and position where it can run (see :mod:`.bare`), else on the bridge. Masks and codes
        are assembled on the CPU (many small writes) and moved to the model's device once per
        layer; results return on the CPU."""
        a, n, dev = self.adapter, len(self.prompts), self.device
        idx = torch.arange(n, device=_CPU).repeat(len(ivs))  # row r -> prompt r % n
        R = idx.shape[0]
        hooks, invalid = {}, torch.zeros(R, dtype=torch.bool, device=dev)
        p = self.prompts.n_pos
        for layer in sorted(set().union(*(iv.layers() for iv in ivs))):
            codes = torch.zeros(R, p, a.n_heads, dtype=torch.long, device=_CPU)  # [rows, pos, head]
            remove = base = wonly = None
            renorm = torch.zeros(R, a.n_heads, dtype=torch.bool, device=_CPU)
            for k, iv in enumerate(ivs):
                rows = slice(k * n, (k + 1) * n)
                for ab in iv.ablations:
                    if ab.head.layer == layer:
                        at = (torch.ones(n, p, dtype=torch.bool, device=_CPU) if ab.rows is None
                              else ab.rows.cpu())
                        c = codes[rows, :, ab.head.head]
                        c[at] = METHOD_CODE[ab.method]
                for e in iv.edges:
                    if e.head.layer == layer:
                        if remove is None:
                            remove = torch.zeros(R, a.n_heads, p, p, dtype=torch.bool,
                                                 device=_CPU)
                            base = torch.zeros(R, a.n_heads, dtype=torch.long, device=_CPU)
                            wonly = torch.zeros(R, a.n_heads, dtype=torch.bool, device=_CPU)
                        remove[rows, e.head.head] |= e.remove.cpu()
                        wonly[rows, e.head.head] |= e.weights_only
                        renorm[rows, e.head.head] |= e.renormalise
                        if e.baseline != AblationMethod.ZERO:
                            if (base[rows, e.head.head] > 0).any():
                                raise ValueError(
                                    f"interventions: {iv.label!r} edits head {e.head} twice "
                                    "with a replacement baseline; merge the masks into one edit"
                                )
                            base[rows, e.head.head] = METHOD_CODE[e.baseline]
            if wonly is not None and bool((wonly & renorm).any()):
                raise ValueError(
                    f"interventions: an intervention of layer {layer} both renormalises a "
                    "head's rows and replaces its weights (weights_only); use separate "
                    "interventions")
            codes, renorm = codes.to(dev), renorm.to(dev)
            edge_z = None
            if remove is not None:
                remove, base, wonly = remove.to(dev), base.to(dev), wonly.to(dev)
                weights = self._weight_terms(layer, remove, base, wonly, idx)
                biased = bool(self._value_bias(layer).any())  # b_V kept out of edits
                counted = remove & ~wonly[:, :, None, None] & ~renorm[:, :, None, None]
                stash = {} if biased and self._editable else None
                if self._editable:
                    hooks[(Site.PATTERN, layer)] = pattern_hook(remove, renorm, invalid, weights,
                                                                stash, counted)
                else:  # attention delegated to HF: edit the head outputs instead (exact)
                    edge_z = self._edge_z_hook(layer, remove, renorm, invalid, idx, weights)
                if (base > 0).any():
                    edge_z = self._edge_baseline_hook(layer, remove & ~wonly[:, :, None, None],
                                                      base, idx, edge_z)
                if biased:
                    edge_z = self._bias_hook(layer, counted, base, idx, stash, edge_z)
            if (codes > 0).any() or edge_z is not None:
                hooks[(Site.Z, layer)] = self._z_hook(layer, codes, idx, edge_z)
        if any(iv.direct for iv in ivs):
            self._direct_hooks(ivs, idx, hooks)
        if track:
            deltas = torch.zeros(R, a.n_layers, a.n_heads, device=dev)
            pos = self._read_pos(self.readout)[idx]
            for layer in range(a.n_layers):
                inner = hooks.get((Site.Z, layer))
                hooks[(Site.Z, layer)] = self._track_hook(layer, inner, idx, pos, deltas)
        prompts = self.prompts.take(idx)
        if self._bare is not None and {k[0] for k in hooks} <= BARE_SITES:
            reach = [self._reach(iv) for iv in ivs]
            layer, first = min(r[0] for r in reach), min(r[1] for r in reach)
            vals = self._bare.run(idx, layer, first, hooks, self.readout.take(idx))
            self.n_rows["bare"] += R
            self.work += R * self._bare.work(layer, first)
        else:
            vals = a.read(prompts.tokens, prompts.attention_mask, self.readout.take(idx), hooks)
            self.n_rows["bridge"] += R
            self.work += R
        out = self._metric(vals, prompts, self.clean_values[idx], invalid)
        d = deltas.reshape(len(ivs), n, a.n_layers, a.n_heads).cpu() if track else None
        return out.reshape(len(ivs), n), d
