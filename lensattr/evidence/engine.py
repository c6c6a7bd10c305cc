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

from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

# MetricError, check_metric_output, BARE_SITES, METHOD_CODE, HookBuilders, pattern_hook: still
# importable from here, as before the chunk planning and forward moved out (issue 18)
from ..core.config import RunConfig, run_options
from ..core.distributed import assign, exchange, world
from ..core.metric import Metric, MetricError, check_metric_output  # noqa: F401
from ..core.metrics import as_metric
from ..core.prompts import PromptSet
from ..core.sites import Site
from ..core.types import AblationMethod
from ..models.adapter import Adapter, ModelError
from .bare import BARE_SITES, BareForward  # noqa: F401
from .checkpoint import EvidenceStore
from .chunk_forward import ChunkForward
from .engine_result import EngineResult
from .hooks import METHOD_CODE, HookBuilders, pattern_hook  # noqa: F401
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


class Engine(ChunkForward):
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
        batch_size: int | None = None,
        progress: bool | None = None,
        checkpoint: str | Path | None = None,
        fast: bool | None = None,
        memory_budget: int | None = None,
        run: RunConfig | None = None,
    ):
        # run options: a keyword wins, then ``run`` (a RunConfig), then 64 / True / True
        o = run_options(run, dict(batch_size=batch_size, progress=progress,
                                  checkpoint=checkpoint, fast=fast, memory_budget=memory_budget),
                        dict(batch_size=64, progress=True, checkpoint=None, fast=True,
                             memory_budget=None))
        batch_size, progress, checkpoint = o["batch_size"], o["progress"], o["checkpoint"]
        fast, memory_budget = o["fast"], o["memory_budget"]
        self.adapter = model if isinstance(model, Adapter) else Adapter(model)
        self.adapter.one_device("the intervention engine")
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
        self.bar: Any = None  # an outside progress bar (e.g. the audit's) that run() advances
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
        self.world = world()  # the ranks the interventions are shared by (one when alone)
        self._store = EvidenceStore(self.run_parts, checkpoint, rank=self.world.rank)
        self._planned: dict[str, bool] = {}  # digest -> tracked: planned by an earlier run()
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
        a = self.adapter
        clean = tokens is self.prompts.tokens
        sites = (Site.Z, Site.PATTERN, Site.V) + ((Site.LN_FINAL_SCALE,) if clean else ())
        mask = self.prompts.attention_mask if clean else self.prompts.corrupted_attention_mask
        # batch_size prompts a forward: the forward's own activations stay bounded; what is
        # kept (z, patterns, v) is concatenated along the prompts
        vals, stores = [], []
        for i in range(0, tokens.shape[0], self.batch_size):
            rows = torch.arange(i, min(i + self.batch_size, tokens.shape[0]), device=_CPU)
            stores.append({})
            vals.append(a.read(tokens[rows], None if mask is None else mask[rows],
                               self.readout.take(rows), a.capture_hooks(sites, stores[-1])))
        values = torch.cat(vals)
        store = {k: torch.cat([st[k] for st in stores]) for k in stores[0]}
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
        interventions that do the same thing under other labels are computed once.

        The chunks (interventions sharing one forward) are planned from what earlier calls of
        this engine planned, never from what a checkpoint holds, so a resumed run or another
        number of ranks computes every intervention in the same company: bit for bit the same
        numbers. Saved results are not computed again. Under a process group of
        several ranks (:mod:`lensattr.core.distributed`) each rank runs its share of the
        chunks, balanced by forward work, and the ranks then swap their results."""
        self._check_weights()
        self._editable = self.adapter.pattern_editable
        for iv in interventions:
            self.validate(iv)
        labels = [iv.label for iv in interventions]
        if len(set(labels)) != len(labels):
            raise ValueError("interventions: labels must be unique")
        keys = [iv.digest() for iv in interventions]
        first: dict[str, int] = {}  # digest -> the first intervention that has it
        for k, key in enumerate(keys):
            if key not in self._planned or (track_heads and not self._planned[key]):
                first.setdefault(key, k)
        order = sorted(first.values(), key=lambda k: self._reach(interventions[k]))
        chunks = self._chunks(interventions, order)
        owners = assign([self._chunk_work(interventions, ks) for ks in chunks], self.world.size)
        mine = [ks for ks, r in zip(chunks, owners, strict=True) if r == self.world.rank]
        bar = self.bar if self.bar is not None else tqdm(
            total=len(order), desc=desc, leave=False,
            disable=not self.progress or not order or not self.world.lead)
        if self.bar is not None:
            bar.update(len(interventions) - len(order))  # planned by an earlier call
        work, rows = self.work, dict(self.n_rows)
        computed = self._run_mine(interventions, keys, mine, track_heads, bar)
        if self.world.sharded:
            done = {"computed": computed, "work": self.work - work,
                    "rows": {p: self.n_rows[p] - rows[p] for p in rows}}
            computed = self._swap(keys, mine, track_heads, done, bar)
        if self.bar is None:
            bar.close()
        for key in first:
            self._planned[key] = track_heads or self._planned.get(key, False)
        return self._collect(interventions, keys, track_heads, len(interventions) - computed)

    def _run_mine(self, ivs: list[Intervention], keys: list[str], mine: list[list[int]],
                  track: bool, bar) -> int:
        """Run this rank's chunks, without the interventions whose results are saved; save after
        each. Returns how many interventions were computed."""
        computed = 0
        for chunk in mine:
            # saved by an earlier run: a whole chunk after an interruption (chunks are saved
            # whole), a part only when the interventions or batch size changed since
            ks = [k for k in chunk if self._store.get(keys[k], track) is None]
            if ks:
                v, d = self._run_chunk([ivs[k] for k in ks], track)
                for j, k in enumerate(ks):
                    self._store.put(keys[k], v[j], d[j] if track and d is not None else None)
                self._store.save()
            computed += len(ks)
            bar.update(len(chunk))
        return computed

    def _swap(self, keys: list[str], mine: list[list[int]], track: bool, done: dict,
              bar) -> int:
        """Send this rank's results to every other rank and take theirs. ``done``: what this
        rank computed in this call (interventions, forward work, rows); the engine's counts
        become the sums over the ranks. Returns the interventions computed by all ranks."""
        ours = {keys[k]: self._store.get(keys[k], track) for ks in mine for k in ks}
        where = ("every rank's checkpoint file holds what it computed: rerun the same command "
                 "(with any number of ranks) to resume" if self._store.path is not None else
                 "no checkpoint was given, so nothing was saved: pass a checkpoint to resume")
        got = exchange({"results": ours, **done},
                       f"the results of {len(keys)} interventions", where)
        for r, other in enumerate(got):
            if r == self.world.rank:
                continue
            for key, (v, d) in other["results"].items():
                self._store.remember(key, v, d)
            bar.update(len(other["results"]))
            self.work += other["work"]
            for path, rows in other["rows"].items():
                self.n_rows[path] += rows
        return sum(other["computed"] for other in got)

    def _collect(self, ivs: list[Intervention], keys: list[str], track: bool, reused: int
                 ) -> EngineResult:
        n, a = len(self.prompts), self.adapter
        values = torch.full((len(ivs), n), float("nan"), device=_CPU)
        delta = (torch.zeros(len(ivs), a.n_layers, a.n_heads, device=_CPU)
                 if track else None)
        for k, key in enumerate(keys):  # every key is in the store by now
            v, d = cast(tuple[Tensor, Tensor | None], self._store.get(key, track))
            values[k] = v
            if delta is not None:  # tracking heads: the store gave the deltas too
                delta[k] = cast(Tensor, d)
        return EngineResult([iv.label for iv in ivs], values, delta, keys, reused)

    def _chunk_work(self, ivs: list[Intervention], ks: list[int]) -> float:
        """Forward work of one chunk (as counted in ``work``), for balancing the ranks."""
        rows = len(ks) * len(self.prompts)
        if self._bare is None:
            return float(rows)
        reach = [self._reach(ivs[k]) for k in ks]
        return rows * self._bare.work(min(r[0] for r in reach), min(r[1] for r in reach))

    def _check_weights(self) -> None:
        now = self.adapter.current_weights_hash()
        if now != self.weights_hash:
            raise ModelError(
                f"model: its weights changed after this Engine was built (weights hash "
                f"{self.weights_hash} -> {now}); its reference runs are stale, build a new Engine"
            )
