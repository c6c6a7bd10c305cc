"""Hook builders of the batched engine: head ablations (per position), edge edits through the
pattern or through hook_z, replacement-baseline terms, direct paths and head-output tracking.

A mixin of :class:`lensattr.evidence.engine.Engine`: the methods read the engine's reference
tensors (clean and corrupted z, values and patterns, means, the final norm's scale).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from ..core.sites import Site
from ..core.types import AblationMethod
from ..models.blocks import kv_map

if TYPE_CHECKING:
    from ..core.prompts import PromptSet
    from ..models.adapter import Adapter

__all__ = ["HookBuilders", "METHOD_CODE", "pattern_hook"]

METHOD_CODE = {AblationMethod.ZERO: 1, AblationMethod.MEAN: 2, AblationMethod.RESAMPLE: 3}
_CPU = torch.device("cpu")


class HookBuilders:
    # the engine's reference state these builders read (set by Engine.__init__); z, v, means
    # and the final norm's scale per layer on the model's device, patterns on the CPU
    adapter: Adapter
    prompts: PromptSet
    device: torch.device
    W_O: list[Tensor]  # [head, d_head, d_model]
    z: list[Tensor]  # [batch, pos, head, d_head]
    z_mean: list[Tensor]  # [pos, head, d_head]
    v: list[Tensor]  # [batch, pos, kv_head, d_head]
    patterns: list[Tensor]  # [batch, head, q, k]
    z_corr: list[Tensor] | None  # the corrupted run's (None without corrupted prompts)
    v_corr: list[Tensor] | None
    patterns_corr: list[Tensor] | None
    final_scale: Tensor | None  # [batch, pos, 1] (None: the final norm exposes no scale)
    out_clean: list[Tensor]  # [batch, head, d_model] at the read position, on the CPU
    _edge_mean: dict[int, Tensor]
    _bias_v: dict[int, Tensor]

    def _direct_hooks(self, ivs, idx, hooks) -> None:
        n, a, dev = len(self.prompts), self.adapter, self.device
        R = idx.shape[0]
        dtype = self.z[0].dtype
        sub = torch.zeros(R, self.prompts.n_pos, a.d_model, device=dev, dtype=dtype)
        frozen = torch.zeros(R, dtype=torch.bool, device=_CPU)  # [rows]
        for k, iv in enumerate(ivs):
            rows = slice(k * n, (k + 1) * n)
            for h in iv.direct:
                z = self.z[h.layer][:, :, h.head]  # [batch, pos, d_head]
                if iv.direct_baseline == AblationMethod.ZERO:  # b_V stays: see _value_bias
                    z = z - self._value_bias(h.layer)[h.head].to(z.dtype)
                elif iv.direct_baseline == AblationMethod.MEAN:
                    z = z - self.z_mean[h.layer][None, :, h.head]
                elif iv.direct_baseline == AblationMethod.RESAMPLE:  # validate(): z_corr set
                    z = z - cast(list[Tensor], self.z_corr)[h.layer][:, :, h.head]
                sub[rows] += z @ self.W_O[h.layer][h.head]  # [batch, pos, d_model]
            frozen[rows] = bool(iv.direct)
        frozen = frozen.to(dev)
        scale = cast(Tensor, self.final_scale)[idx]  # validate() refuses direct paths without

        def resid(x, p0=0):
            return x - sub[:, p0:].to(x.device, x.dtype)

        def freeze(s, p0=0):
            return torch.where(frozen.to(s.device)[:, None, None], scale[:, p0:].to(s.dtype), s)

        hooks[(Site.RESID_FINAL, None)] = resid
        hooks[(Site.LN_FINAL_SCALE, None)] = freeze

    def _weight_terms(self, layer, remove, base, wonly, idx):
        """The replacement weights of weights-only edge edits: [rows, head, q, k], zero
        outside the edited entries (the corrupted prompt's weights under resample, the
        prompt-set mean under mean); None when no edit of this layer is weights-only."""
        sel = remove & wonly[:, :, None, None]  # [rows, head, q, k]
        if not bool(sel.any()):
            return None
        dev = sel.device
        out = torch.zeros(sel.shape, dtype=self.patterns[layer].dtype, device=dev)
        res = sel & (base == METHOD_CODE[AblationMethod.RESAMPLE])[:, :, None, None]
        if res.any():
            out = torch.where(res, self.patterns_corr[layer][idx].to(dev), out)
        mean = sel & (base == METHOD_CODE[AblationMethod.MEAN])[:, :, None, None]
        if mean.any():
            avg = self.patterns[layer].mean(0).to(dev)  # [head, q, k]
            out = torch.where(mean, avg[None], out)
        return out

    def _edge_z_hook(self, layer, remove, renorm, invalid, idx, weights=None):
        """Edge edits through hook_z, for models whose hook_pattern edits are discarded.

        Removing sources S from a row subtracts their per-source terms alpha[q, s] * v[s]
        from z (renormalising divides what is left by the mass left); weights-only edits add
        back the replacement weight times the run's value, ``weights[q, s] * v[s]``. It uses
        the clean pattern and values of this layer, which are the in-forward ones because
        :meth:`validate` refuses edits upstream of an edge edit on such models."""
        v = self.v[layer][idx]  # [rows, k, kv_head, d_head]
        pat = self.patterns[layer][idx].to(v.device)  # [rows, head, q, k]
        kv = kv_map(self.adapter, v.device)
        v = v[:, :, kv]  # [rows, k, head, d_head], each query head's own values
        cut = pat * remove.to(pat.dtype)  # removed weights
        if weights is not None:  # weights-only entries: alpha -> the replacement weight
            cut = cut - weights.to(pat.dtype)
        removed = torch.einsum("rhqk,rkhd->rqhd", cut, v)  # [rows, q, head, d_head]
        left = (pat - cut).sum(-1).transpose(1, 2)[..., None]  # [rows, q, head, 1]
        edited = remove.any(-1).transpose(1, 2)[..., None] & renorm[:, None, :, None]
        empty = edited & (left < 1e-6)
        invalid.logical_or_(empty.flatten(1).any(1))

        def edit(z, p0=0):
            out = z - removed[:, p0:].to(z.dtype)
            keep = (edited & ~empty)[:, p0:]
            return torch.where(keep, out / left[:, p0:].clamp(min=1e-30).to(z.dtype), out)

        return edit

    def _edge_baseline_hook(self, layer, remove, base, idx, inner=None):
        """Add the baseline counterparts of removed per-source terms to z: the corrupted
        prompt's alpha_c[q, s] * v_c[s] (resample) or the prompt-set mean of alpha[q, s] * v[s]
        (mean). Together with the removal this replaces the removed sources' terms."""
        dev = self.v[layer].device
        kv = kv_map(self.adapter, dev)
        added = 0.0
        res = remove & (base == METHOD_CODE[AblationMethod.RESAMPLE])[:, :, None, None]
        if res.any():
            v = self.v_corr[layer][idx][:, :, kv]  # [rows, k, head, d_head]
            pat = self.patterns_corr[layer][idx].to(dev, v.dtype)  # [rows, head, q, k]
            w = pat * res.to(pat.dtype)  # [rows, head, q, k]
            added = added + torch.einsum("rhqk,rkhd->rqhd", w, v)  # [rows, q, head, d_head]
        mean = remove & (base == METHOD_CODE[AblationMethod.MEAN])[:, :, None, None]
        if mean.any():
            terms = self._mean_terms(layer, kv)  # [head, q, k, d_head]
            added = added + torch.einsum("rhqk,hqkd->rqhd", mean.to(terms.dtype), terms)

        def edit(z, p0=0):
            if inner is not None:
                z = inner(z, p0)
            if isinstance(added, float):  # nothing removed under a replacement baseline
                return z
            return z + added[:, p0:].to(z.device, z.dtype)

        return edit

    def _mean_terms(self, layer: int, kv: Tensor) -> Tensor:
        """Prompt-set mean of the per-source terms alpha[q, s] * v[s]: [head, q, k, d_head]."""
        if layer not in self._edge_mean:
            v = self.v[layer][:, :, kv]  # [batch, k, head, d_head]
            pat = self.patterns[layer].to(v.device, v.dtype)  # [batch, head, q, k]
            terms = torch.einsum("bhqk,bkhd->hqkd", pat, v) / pat.shape[0]
            self._edge_mean[layer] = terms
        return self._edge_mean[layer]

    def _value_bias(self, layer: int) -> Tensor:
        """The layer's value bias per query head [head, d_head] (zeros when it has none).

        Zero-baseline convention, independent of weight processing: the part of a head's
        output that does not depend on attention, b_V (attention sums to one, so every row
        writes b_V @ W_O whatever the pattern), belongs to the layer's bias, not to any head's
        routing. Zero ablation sets z to b_V (removing sum_s alpha_s (v_s - b_V)), and an edge
        edit removes or replaces the terms alpha_s (v_s - b_V). With value biases folded into
        b_O (``enable_compatibility_mode``, ``fold_value_biases``) b_V is zero and the same
        edits give the same numbers."""
        if layer not in self._bias_v:
            self._bias_v[layer] = self.adapter.b_V(layer).to(self.device, self.z[layer].dtype)
        return self._bias_v[layer]

    def _bias_hook(self, layer, counted, base, idx, stash, inner=None):
        """Keep b_V out of edge edits (see :meth:`_value_bias`): add back b_V times the weight
        removed at the ``counted`` entries ([rows, head, q, k]: removals, not renormalised,
        not weights-only) minus the weight of their replacements. The removed weight comes
        from the pattern hook (``stash``), or, on the z route (``stash`` None), from the clean
        pattern, which is the in-forward one there. Renormalised rows keep their mass (one)
        and weights-only entries follow pattern patching's convention (values kept as run)."""
        bv = self._value_bias(layer)  # [head, d_head]
        dev = bv.device
        added = torch.zeros(counted.shape[:3], device=dev, dtype=bv.dtype)  # [rows, head, q]
        res = counted & (base == METHOD_CODE[AblationMethod.RESAMPLE])[:, :, None, None]
        if res.any():
            pc = self.patterns_corr[layer][idx].to(dev, bv.dtype)
            added = added + (pc * res.to(bv.dtype)).sum(-1)
        mean = counted & (base == METHOD_CODE[AblationMethod.MEAN])[:, :, None, None]
        if mean.any():
            avg = self.patterns[layer].mean(0).to(dev, bv.dtype)  # [head, q, k]
            added = added + (avg[None] * mean.to(bv.dtype)).sum(-1)
        if stash is None:
            pat = self.patterns[layer][idx].to(dev, bv.dtype)
            stash = {"mass": (pat * counted.to(bv.dtype)).sum(-1), "p0": 0}

        def edit(z, p0=0):  # z: [rows, q, head, d_head], queries from p0
            if inner is not None:
                z = inner(z, p0)
            cut = stash["mass"][:, :, p0 - stash["p0"]:] - added[:, :, p0:]  # [rows, head, q]
            return z + (cut.transpose(1, 2)[..., None] * bv).to(z.dtype)

        return edit

    def _z_hook(self, layer: int, codes: Tensor, idx: Tensor, edge_z=None):
        mean = self.z_mean[layer]
        bias = self._value_bias(layer)  # zero ablation keeps b_V (see _value_bias)
        resample = self.z_corr is not None and bool((codes == 3).any())
        # [rows, pos, head, d_head]
        corr = self.z_corr[layer][idx] if self.z_corr is not None and resample else None

        def hook(z, p0=0):  # z: [rows, pos, head, d_head] of positions p0 onwards
            if edge_z is not None:
                z = edge_z(z, p0)
            c = codes[:, p0:].to(z.device)[..., None]  # [rows, pos, head, 1]
            z = torch.where(c == 1, bias.to(z.dtype).expand_as(z), z)
            z = torch.where(c == 2, mean[p0:].to(z.device, z.dtype)[None], z)
            if corr is not None:
                z = torch.where(c == 3, corr[:, p0:].to(z.device, z.dtype), z)
            return z

        return hook

    def _track_hook(self, layer, inner, idx, pos, deltas):
        W_O = self.W_O[layer]
        clean = self.out_clean[layer][idx].to(deltas.device)  # [rows, head, d_model]
        pos = pos.to(deltas.device)

        def hook(z, p0=0):
            if inner is not None:
                z = inner(z, p0)
            rows = torch.arange(z.shape[0], device=z.device)
            at = pos.to(z.device) - p0
            out = torch.einsum("bhd,hdm->bhm", z[rows, at], W_O.to(z.dtype))
            deltas[:, layer] = (out - clean.to(out.dtype)).norm(dim=-1).to(deltas.device)
            return z

        return hook


def pattern_hook(remove: Tensor, renorm: Tensor, invalid: Tensor, weights: Tensor | None = None,
                 stash: dict | None = None, counted: Tensor | None = None):
    """Set the removed weights to 0 (renormalising the rows flagged in ``renorm``), or, where
    ``weights`` ([rows, head, q, k], zero elsewhere) holds weights-only replacements, to those.
    ``stash``: receives ``mass`` [rows, head, q], the in-forward weight removed at the entries
    ``counted`` selects (for the value-bias correction of the z hook), and ``p0``."""
    def hook(pattern, p0=0):  # [rows, head, query_pos, key_pos], queries from p0 onwards
        rm = remove[:, :, p0:].to(pattern.device)
        if stash is not None:
            sel = counted[:, :, p0:].to(pattern.device, pattern.dtype)
            stash["mass"], stash["p0"] = (pattern * sel).sum(-1), p0
        new = pattern.masked_fill(rm, 0.0)
        if weights is not None:
            new = new + weights[:, :, p0:].to(pattern.device, pattern.dtype)
        if renorm.any():
            mass = new.sum(-1, keepdim=True)  # [rows, head, query_pos, 1]
            edited = rm.any(-1, keepdim=True) & renorm.to(pattern.device)[:, :, None, None]
            empty = edited & (mass < 1e-6)
            invalid.logical_or_(empty.flatten(1).any(1).to(invalid.device))
            new = torch.where(edited & ~empty, new / mass.clamp(min=1e-30), new)
        return new

    return hook
