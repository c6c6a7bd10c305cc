"""AtPResult: attribution-patching scores with per-prompt values, tidy frames and meta."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.types import HeadId

__all__ = ["AtPResult", "KINDS"]

# score tensors a result may hold, and the names of their axes after ``batch``
KINDS = {
    "heads": ("layer", "head"),
    "heads_by_pos": ("layer", "pos", "head"),
    "q": ("layer", "pos", "head"),
    "k": ("layer", "pos", "kv_head"),
    "v": ("layer", "pos", "kv_head"),
    "q_star": ("layer", "pos", "head"),
    "k_star": ("layer", "pos", "kv_head"),
    "edges": ("layer", "head", "query_pos", "key_pos"),
    "graddrop": ("layer", "head"),
}


@dataclass
class AtPResult:
    """First-order (attribution-patching) estimates of patching effects on a metric.

    Every score is per prompt (axis 0 = ``batch``) and estimates ``m(patched) - m(base)``:
    noising (``meta["mode"] == "noising"``): patch the corrupted activation into the clean run,
    ``(a_corr - a_clean) . dm/da`` at the clean run; denoising (and ``"tl"``): patch the clean
    activation into the corrupted run, ``(a_clean - a_corr) . dm/da`` at the corrupted run.

    heads: ``[batch, layer, head]`` a head's output (hook_z) at every position.
    heads_by_pos: ``[batch, layer, pos, head]`` the same per position (sums to ``heads``).
    q, k, v: ``[batch, layer, pos, head or kv_head]`` plain AtP of one head's query (key, value
        of a key/value head) at one position; None on the bridge path.
    q_star, k_star: the same with AtP*'s exact softmax (``qk_fix=True``), else None.
    edges: ``[batch, layer, head, query_pos, key_pos]`` one attention-pattern entry; NaN
        outside the metric's read rows, and everywhere where pattern edits do not reach the
        output (encoders whose attention runs inside the HF module).
    graddrop: ``[batch, layer, head]`` AtP*'s GradDrop score of each head's output (an
        unsigned magnitude; see :func:`~lensattr.evidence.attribution.atp`), else None.
        ``graddrop_of_mean`` is the paper's definition on the prompt means.
    base, other: ``[batch]`` the metric on the run the gradient is taken at and on the other.
    meta: model, prompts hash, metric, mode, options, path (hook-free or bridge), version.
    """

    heads: Float[Tensor, "batch layer head"]
    heads_by_pos: Float[Tensor, "batch layer pos head"]
    edges: Float[Tensor, "batch layer head query_pos key_pos"]
    base: Float[Tensor, " batch"]
    other: Float[Tensor, " batch"]
    q: Float[Tensor, "batch layer pos head"] | None = None
    k: Float[Tensor, "batch layer pos kv_head"] | None = None
    v: Float[Tensor, "batch layer pos kv_head"] | None = None
    q_star: Float[Tensor, "batch layer pos head"] | None = None
    k_star: Float[Tensor, "batch layer pos kv_head"] | None = None
    graddrop: Float[Tensor, "batch layer head"] | None = None
    graddrop_of_mean: Float[Tensor, "layer head"] | None = None
    meta: dict = field(default_factory=dict)

    def mean(self, kind: str = "heads") -> Tensor:
        """The mean over prompts of one score tensor (``kind`` in :data:`KINDS`); for
        ``graddrop``, the paper's definition on the prompt means (``graddrop_of_mean``)."""
        if kind == "graddrop":
            self._get("graddrop")
            return cast(Tensor, self.graddrop_of_mean)  # atp() computes it with graddrop
        return self._get(kind).mean(0)

    def _get(self, kind: str) -> Tensor:
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
        t = getattr(self, kind)
        if t is None:
            raise ValueError(f"kind: {kind!r} was not computed ({self._why(kind)})")
        return t

    def _why(self, kind: str) -> str:
        if kind in ("q_star", "k_star"):
            return "pass qk_fix=True on a model the hook-free forward runs"
        if kind == "graddrop":
            return "pass graddrop=True"
        return f"path {self.meta.get('path')!r}: {self.meta.get('path_reason')}"

    def top(self, k: int = 10) -> list[tuple[HeadId, float]]:
        """The ``k`` heads with the largest |mean head score|, largest first."""
        m = self.heads.mean(0)
        order = m.abs().flatten().argsort(descending=True)[:k].tolist()
        nh = m.shape[1]
        return [(HeadId(i // nh, i % nh), float(m.flatten()[i])) for i in order]

    def to_frame(self, kind: str = "heads") -> pd.DataFrame:
        """One row per item of ``kind`` (per layer/head, per layer/pos/head, per read-row edge,
        ...): its mean score over prompts, the standard error, the number of prompts and, for
        the signed kinds, the share of prompts with the mean's sign. Edges: only read rows."""
        t = self._get(kind).detach().double()
        names = KINDS[kind]
        n = t.shape[0]
        mean = self.mean(kind).double() if kind == "graddrop" else t.nanmean(0)
        idx = torch.cartesian_prod(*(torch.arange(s) for s in t.shape[1:]))
        if idx.ndim == 1:
            idx = idx[:, None]
        flat = t.reshape(n, -1)  # [batch, items]
        keep = ~torch.isnan(flat).all(0)
        ok = ~torch.isnan(flat)
        cnt = ok.sum(0).clamp(min=1)
        centred = torch.where(ok, flat - flat.nanmean(0), 0.0)
        sd = (centred.square().sum(0) / (cnt - 1).clamp(min=1)).sqrt()
        frame = pd.DataFrame({name: idx[:, j].numpy() for j, name in enumerate(names)})
        frame["score"] = mean.reshape(-1).numpy()
        frame["se"] = (sd / cnt.sqrt()).numpy()
        frame["n_prompts"] = ok.sum(0).numpy()
        if kind != "graddrop":
            sign = torch.sign(flat.nanmean(0))
            agree = (torch.sign(flat) == sign) & ok
            frame["sign_share"] = (agree.sum(0) / cnt).numpy()
        else:
            frame["n_prompts"] = n
        frame = frame[keep.numpy()].reset_index(drop=True)
        frame.insert(0, "kind", kind)
        return frame

    def tl_node_scores(self) -> dict[tuple[int, int, int], float]:
        """Head-output node scores in TransformerLens's ``attribution_patch`` layout:
        ``(layer, head, position) -> mean score`` (TL's ``Node("attn_head_out", position,
        layer, head)``). TL's convention is denoising: run with ``mode="tl"``."""
        if self.meta.get("mode") not in ("denoising", "tl"):
            raise ValueError(
                f"mode: TL's attribution_patch scores denoising; this result is "
                f"{self.meta.get('mode')!r}; rerun with mode='tl'")
        m = self.heads_by_pos.mean(0)  # [layer, pos, head]
        L, P, H = m.shape
        return {(la, h, p): float(m[la, p, h]) for la in range(L) for p in range(P)
                for h in range(H)}

    def __repr__(self) -> str:
        b, L, H = self.heads.shape
        top = ", ".join(f"{h}={s:+.3g}" for h, s in self.top(3))
        gap = float((self.other - self.base).mean())
        return (f"AtPResult(mode={self.meta.get('mode')!r}, {b} prompts, {L}x{H} heads, "
                f"path={self.meta.get('path')!r}, m(other)-m(base)={gap:+.4g}, top: {top})")


def nan_like(shape, device=None) -> Tensor:
    return torch.full(shape, math.nan, device=device)
