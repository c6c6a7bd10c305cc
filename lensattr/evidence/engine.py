"""The batched intervention engine.

Many interventions run in one forward pass by stacking copies of the prompt batch along the
batch dimension (row ``r = k * n_prompts + i`` is intervention ``k`` on prompt ``i``) and letting
each hook edit only its own rows, with masks. Hooks live only inside the adapter's context.
Results can be checkpointed to a safetensors file after every chunk, so an interrupted sweep
resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..metrics import Metric, MetricError, as_metric, check_metric_output
from ..model import Adapter, Site
from ..prompts import PromptSet
from ..types import AblationMethod
from .interventions import Intervention

__all__ = ["Engine", "EngineResult"]

_METHOD_CODE = {AblationMethod.ZERO: 1, AblationMethod.MEAN: 2, AblationMethod.RESAMPLE: 3}


@dataclass
class EngineResult:
    """Per-prompt metric values of each intervention.

    values: ``[intervention, batch]`` metric on each prompt (NaN where an intervention was not
        computable, e.g. renormalised knockout with no mass left).
    head_delta: ``[intervention, batch, layer, head_index]`` norm of the change of every head's
        output (z @ W_O) at the metric's read position, or None when not tracked.
    """

    labels: list[str]
    values: Float[Tensor, "intervention batch"]
    head_delta: Float[Tensor, "intervention batch layer head_index"] | None = None

    def __getitem__(self, label: str) -> Tensor:
        return self.values[self.labels.index(label)]


class Engine:
    """Clean and corrupted reference runs plus batched interventions for one prompt set."""

    def __init__(
        self,
        model,
        prompts: PromptSet,
        metric,
        *,
        batch_size: int = 64,
        progress: bool = True,
        checkpoint: str | Path | None = None,
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
        self.progress = progress
        self.bar = None  # an outside progress bar (e.g. the audit's) that run() advances
        a, n = self.adapter, len(prompts)
        self.W_O = [a.W_O(layer) for layer in range(a.n_layers)]  # [head, d_head, d_model]
        self.clean_values, self.z, self.patterns = self._reference(prompts.tokens)
        self.clean = self._metric(self.clean_values, prompts, self.clean_values)
        self.z_mean = [self._masked_mean(z) for z in self.z]  # [pos, head, d_head]
        self.z_corr = self.patterns_corr = self.v_corr = self.corrupted = None
        if prompts.corrupted is not None:
            cv, self.z_corr, self.patterns_corr = self._reference(prompts.corrupted)
            self.corrupted = self._metric(cv, prompts.corrupted_view(), self.clean_values)
        self._edge_mean: dict[int, Tensor] = {}
        rows = torch.arange(n)
        pos = self._read_pos(self.readout)
        self.out_clean = [  # [batch, head, d_model] each head's output at the read position
            torch.einsum("bhd,hdm->bhm", z[rows, pos], w)
            for z, w in zip(self.z, self.W_O, strict=True)
        ]
        self._ckpt_path = Path(checkpoint) if checkpoint else None
        self._ckpt: dict[str, Tensor] = {}
        key = json.dumps([a.config_hash(), a.weights_hash(), prompts.hash(),
                          self.metric.describe()], default=str)
        self.run_key = hashlib.sha256(key.encode()).hexdigest()[:16]
        if self._ckpt_path is not None and self._ckpt_path.exists():
            from safetensors import safe_open

            with safe_open(str(self._ckpt_path), "pt") as f:
                same = (f.metadata() or {}).get("run_key") == self.run_key
            self._ckpt = load_file(str(self._ckpt_path)) if same else {}

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
        return values, z, [store[(Site.PATTERN, layer)] for layer in layers]

    def _masked_mean(self, z: Tensor) -> Tensor:
        v = self.prompts.valid.to(z.dtype)[:, :, None, None]  # [batch, pos, 1, 1]
        return (z * v).sum(0) / v.sum(0).clamp(min=1)

    def _read_pos(self, readout) -> Tensor:
        if readout.positions is not None:
            return readout.positions
        return self.prompts.roles["END"]

    def _metric(self, values, prompts: PromptSet, clean, invalid: Tensor | None = None
                ) -> Tensor:
        """The metric per row, after checking the readout; rows marked ``invalid`` (edits that
        could not be made) are NaN and exempt from the checks."""
        n = values.shape[0]
        invalid = torch.zeros(n, dtype=torch.bool) if invalid is None else invalid
        values = values.float()
        if (~torch.isfinite(values.reshape(n, -1)).all(1) & ~invalid).any():
            raise MetricError(
                "model output: NaN or inf in the logits read by the metric; check the model's "
                "weights, inputs and interventions"
            )
        values[invalid] = 0.0
        out = check_metric_output(self.metric.compute(values, prompts, clean), n,
                                  self.metric.name).clone()
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
        if iv.edges and not self.adapter.pattern_editable:
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
        for iv in interventions:
            self.validate(iv)
        labels = [iv.label for iv in interventions]
        if len(set(labels)) != len(labels):
            raise ValueError("interventions: labels must be unique")
        n = len(self.prompts)
        a = self.adapter
        values = torch.full((len(interventions), n), float("nan"))
        delta = torch.zeros(len(interventions), n, a.n_layers, a.n_heads) if track_heads else None
        todo = []
        for k, iv in enumerate(interventions):
            key = self._ckpt_key(iv.label)
            if key in self._ckpt and (not track_heads or "d" + key in self._ckpt):
                values[k] = self._ckpt[key]
                if track_heads:
                    delta[k] = self._ckpt["d" + key]
            else:
                todo.append(k)
        per_chunk = max(1, self.batch_size // n)
        own = self.bar is None
        bar = self.bar if not own else tqdm(
            total=len(todo), desc=desc, disable=not self.progress or not todo, leave=False
        )
        if not own:
            bar.update(len(interventions) - len(todo))  # resumed from the checkpoint
        for start in range(0, len(todo), per_chunk):
            ks = todo[start : start + per_chunk]
            v, d = self._run_chunk([interventions[k] for k in ks], track_heads)
            for j, k in enumerate(ks):
                values[k] = v[j]
                self._ckpt[self._ckpt_key(interventions[k].label)] = v[j].contiguous()
                if track_heads:
                    delta[k] = d[j]
                    self._ckpt["d" + self._ckpt_key(interventions[k].label)] = d[j].contiguous()
            self._save_ckpt()
            bar.update(len(ks))
        if own:
            bar.close()
        return EngineResult(labels, values, delta)

    def _ckpt_key(self, label: str) -> str:
        return hashlib.sha256(label.encode()).hexdigest()[:24]

    def _save_ckpt(self) -> None:
        if self._ckpt_path is None:
            return
        self._ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._ckpt_path.with_suffix(".tmp")
        save_file(self._ckpt, str(tmp), metadata={"run_key": self.run_key})
        tmp.replace(self._ckpt_path)

    def _run_chunk(self, ivs: list[Intervention], track: bool):
        a, n = self.adapter, len(self.prompts)
        idx = torch.arange(n).repeat(len(ivs))  # row r -> prompt r % n
        R = idx.shape[0]
        hooks, invalid = {}, torch.zeros(R, dtype=torch.bool)
        p = self.prompts.n_pos
        for layer in sorted(set().union(*(iv.layers() for iv in ivs))):
            codes = torch.zeros(R, p, a.n_heads, dtype=torch.long)  # [rows, pos, head]
            remove = base = None
            renorm = torch.zeros(R, a.n_heads, dtype=torch.bool)
            for k, iv in enumerate(ivs):
                rows = slice(k * n, (k + 1) * n)
                for ab in iv.ablations:
                    if ab.head.layer == layer:
                        at = torch.ones(n, p, dtype=torch.bool) if ab.rows is None else ab.rows
                        c = codes[rows, :, ab.head.head]
                        c[at] = _METHOD_CODE[ab.method]
                for e in iv.edges:
                    if e.head.layer == layer:
                        if remove is None:
                            remove = torch.zeros(R, a.n_heads, p, p, dtype=torch.bool)
                            base = torch.zeros(R, a.n_heads, dtype=torch.long)
                        remove[rows, e.head.head] |= e.remove
                        renorm[rows, e.head.head] |= e.renormalise
                        if e.baseline != AblationMethod.ZERO:
                            if (base[rows, e.head.head] > 0).any():
                                raise ValueError(
                                    f"interventions: {iv.label!r} edits head {e.head} twice "
                                    "with a replacement baseline; merge the masks into one edit"
                                )
                            base[rows, e.head.head] = _METHOD_CODE[e.baseline]
            edge_z = None
            if remove is not None:
                if a.pattern_editable:
                    hooks[(Site.PATTERN, layer)] = _pattern_hook(remove, renorm, invalid)
                else:  # attention delegated to HF: edit the head outputs instead (exact)
                    edge_z = self._edge_z_hook(layer, remove, renorm, invalid, idx)
                if (base > 0).any():
                    edge_z = self._edge_baseline_hook(layer, remove, base, idx, edge_z)
            if (codes > 0).any() or edge_z is not None:
                hooks[(Site.Z, layer)] = self._z_hook(layer, codes, idx, edge_z)
        if any(iv.direct for iv in ivs):
            self._direct_hooks(ivs, idx, hooks)
        if track:
            deltas = torch.zeros(R, a.n_layers, a.n_heads)
            pos = self._read_pos(self.readout)[idx]
            for layer in range(a.n_layers):
                inner = hooks.get((Site.Z, layer))
                hooks[(Site.Z, layer)] = self._track_hook(layer, inner, idx, pos, deltas)
        prompts = self.prompts.take(idx)
        vals = a.read(prompts.tokens, prompts.attention_mask, self.readout.take(idx), hooks)
        out = self._metric(vals, prompts, self.clean_values[idx], invalid)
        d = deltas.reshape(len(ivs), n, a.n_layers, a.n_heads) if track else None
        return out.reshape(len(ivs), n), d

    def _direct_hooks(self, ivs, idx, hooks) -> None:
        n, a = len(self.prompts), self.adapter
        R = idx.shape[0]
        sub = torch.zeros(R, self.prompts.n_pos, a.d_model)  # [rows, pos, d_model]
        frozen = torch.zeros(R, dtype=torch.bool)
        for k, iv in enumerate(ivs):
            rows = slice(k * n, (k + 1) * n)
            for h in iv.direct:
                z = self.z[h.layer][:, :, h.head]  # [batch, pos, d_head]
                if iv.direct_baseline == AblationMethod.MEAN:
                    z = z - self.z_mean[h.layer][None, :, h.head]
                elif iv.direct_baseline == AblationMethod.RESAMPLE:
                    z = z - self.z_corr[h.layer][:, :, h.head]
                sub[rows] += z @ self.W_O[h.layer][h.head]  # [batch, pos, d_model]
            frozen[rows] = bool(iv.direct)
        scale = self.final_scale[idx]

        def resid(x):
            return x - sub.to(x.device, x.dtype)

        def freeze(s):
            return torch.where(frozen.to(s.device)[:, None, None], scale.to(s.dtype), s)

        hooks[(Site.RESID_FINAL, None)] = resid
        hooks[(Site.LN_FINAL_SCALE, None)] = freeze

    def _edge_z_hook(self, layer, remove, renorm, invalid, idx):
        """Edge edits through hook_z, for models whose hook_pattern edits are discarded.

        Removing sources S from a row subtracts their per-source terms alpha[q, s] * v[s]
        from z (renormalising divides what is left by the mass left). It uses the clean
        pattern and values of this layer, which are the in-forward ones because
        :meth:`validate` refuses edits upstream of an edge edit on such models."""
        pat = self.patterns[layer][idx]  # [rows, head, q, k]
        v = self.v[layer][idx]  # [rows, k, kv_head, d_head]
        kv = torch.tensor([self.adapter.kv_head(h) for h in range(self.adapter.n_heads)])
        v = v[:, :, kv]  # [rows, k, head, d_head], each query head's own values
        cut = pat * remove.to(pat.dtype)  # removed weights
        removed = torch.einsum("rhqk,rkhd->rqhd", cut, v)  # [rows, q, head, d_head]
        left = (pat - cut).sum(-1).transpose(1, 2)[..., None]  # [rows, q, head, 1]
        edited = remove.any(-1).transpose(1, 2)[..., None] & renorm[:, None, :, None]
        empty = edited & (left < 1e-6)
        invalid.logical_or_(empty.flatten(1).any(1))

        def edit(z):
            out = z - removed.to(z.dtype)
            return torch.where(edited & ~empty, out / left.clamp(min=1e-30).to(z.dtype), out)

        return edit

    def _edge_baseline_hook(self, layer, remove, base, idx, inner=None):
        """Add the baseline counterparts of removed per-source terms to z: the corrupted
        prompt's alpha_c[q, s] * v_c[s] (resample) or the prompt-set mean of alpha[q, s] * v[s]
        (mean). Together with the removal this replaces the removed sources' terms."""
        kv = torch.tensor([self.adapter.kv_head(h) for h in range(self.adapter.n_heads)])
        added = 0.0
        res = remove & (base == _METHOD_CODE[AblationMethod.RESAMPLE])[:, :, None, None]
        if res.any():
            pat, v = self.patterns_corr[layer][idx], self.v_corr[layer][idx][:, :, kv]
            w = pat * res.to(pat.dtype)  # [rows, head, q, k]
            added = added + torch.einsum("rhqk,rkhd->rqhd", w, v)  # [rows, q, head, d_head]
        mean = remove & (base == _METHOD_CODE[AblationMethod.MEAN])[:, :, None, None]
        if mean.any():
            terms = self._mean_terms(layer, kv)  # [head, q, k, d_head]
            added = added + torch.einsum("rhqk,hqkd->rqhd", mean.to(terms.dtype), terms)

        def edit(z):
            if inner is not None:
                z = inner(z)
            if isinstance(added, float):  # nothing removed under a replacement baseline
                return z
            return z + added.to(z.device, z.dtype)

        return edit

    def _mean_terms(self, layer: int, kv: Tensor) -> Tensor:
        """Prompt-set mean of the per-source terms alpha[q, s] * v[s]: [head, q, k, d_head]."""
        if layer not in self._edge_mean:
            pat, v = self.patterns[layer], self.v[layer][:, :, kv]  # v: [batch, k, head, d]
            terms = torch.einsum("bhqk,bkhd->hqkd", pat, v) / pat.shape[0]
            self._edge_mean[layer] = terms
        return self._edge_mean[layer]

    def _z_hook(self, layer: int, codes: Tensor, idx: Tensor, edge_z=None):
        mean = self.z_mean[layer]
        corr = None if self.z_corr is None else self.z_corr[layer]

        def hook(z):  # z: [rows, pos, head, d_head]
            if edge_z is not None:
                z = edge_z(z)
            c = codes.to(z.device)[..., None]  # [rows, pos, head, 1]
            z = torch.where(c == 1, torch.zeros_like(z), z)
            z = torch.where(c == 2, mean.to(z.dtype)[None], z)
            if corr is not None and (codes == 3).any():
                z = torch.where(c == 3, corr[idx].to(z.dtype), z)
            return z

        return hook

    def _track_hook(self, layer, inner, idx, pos, deltas):
        W_O, clean = self.W_O[layer], self.out_clean[layer]

        def hook(z):
            if inner is not None:
                z = inner(z)
            rows = torch.arange(z.shape[0])
            out = torch.einsum("bhd,hdm->bhm", z[rows, pos], W_O)  # [rows, head, d_model]
            deltas[:, layer] = (out - clean[idx]).norm(dim=-1).cpu()
            return z

        return hook


def _pattern_hook(remove: Tensor, renorm: Tensor, invalid: Tensor):
    def hook(pattern):  # [rows, head, query_pos, key_pos]
        rm = remove.to(pattern.device)
        new = pattern.masked_fill(rm, 0.0)
        if renorm.any():
            mass = new.sum(-1, keepdim=True)  # [rows, head, query_pos, 1]
            edited = rm.any(-1, keepdim=True) & renorm.to(pattern.device)[:, :, None, None]
            empty = edited & (mass < 1e-6)
            invalid.logical_or_(empty.flatten(1).any(1).cpu())
            new = torch.where(edited & ~empty, new / mass.clamp(min=1e-30), new)
        return new

    return hook
