"""Result objects of activation and path patching: per-prompt values, effects with intervals,
tidy frames, and the export to TransformerLens's ``PatchingResult``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..stats.inference import signflip_p
from ..stats.ratio import fieller

__all__ = ["ActivationPatching", "PathPatching", "patch_statistics", "ROUNDING"]

ROUNDING = 1e-6  # relative size of a metric change that float32 rounding can produce


def patch_statistics(values: Tensor, base: Tensor, source: Tensor, seed: int = 0) -> dict:
    """Per cell (leading axes of ``values`` [..., batch]): the effect
    ``mean(values - base) / mean(source - base)`` (0 = the patch changes nothing, 1 = it moves
    the metric as far as the whole source run) with Fieller's 95% interval, and the sign-flip
    p-value that ``mean(values - base) = 0``. NaN where a cell was not computed. A change
    below ``ROUNDING`` times the prompt's metric scale (``|base| + |source| + 1``) is float32
    rounding (another order of the same sums) and counts as 0, so that rounding noise is not
    reported as a significant effect."""
    shape = values.shape[:-1]
    num = (values - base).reshape(-1, values.shape[-1]).double()
    floor = ROUNDING * (base.abs() + source.abs() + 1).double()  # [batch]
    num = torch.where(num.abs() <= floor, 0.0, num)
    den = (source - base).double().expand_as(num)
    ok = torch.isfinite(num).all(-1)
    eff, lo, hi = (torch.full((num.shape[0],), float("nan"), dtype=torch.float64)
                   for _ in range(3))
    p = torch.full((num.shape[0],), float("nan"))
    if ok.any():
        v, a, b, _ = fieller(num[ok], den[ok])
        eff[ok], lo[ok], hi[ok] = v, a, b
        p[ok] = signflip_p(num[ok], seed=seed)
    return {k: t.reshape(shape) for k, t in
            (("effect", eff), ("effect_lo", lo), ("effect_hi", hi), ("p_value", p))}


@dataclass
class ActivationPatching:
    """Activation patching of every head at one site (``z``, ``q``, ``k``, ``v`` or ``pattern``).

    ``values``: the metric on each prompt with one cell patched, ``[*axes, batch]``; ``axes``
    are TransformerLens's names: ``(layer, head)`` all positions, ``(layer, pos, head)`` by
    position; patterns ``(layer, head_index)``, ``(layer, head_index, dest_pos)``,
    ``(layer, head_index, dest_pos, src_pos)``. Under grouped-query attention ``k`` / ``v``
    cells are key/value heads. ``base``: the metric of the unpatched run patched into,
    ``source``: of the run patched from ([batch]; denoising: base = corrupted, source = clean).
    ``effect`` / ``effect_lo`` / ``effect_hi`` / ``p_value`` ``[*axes]``: see
    :func:`patch_statistics`. All tensors on the CPU.
    """

    site: str
    axes: tuple[str, ...]
    values: Float[Tensor, "*cells batch"]
    base: Float[Tensor, " batch"]
    source: Float[Tensor, " batch"]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        stats = patch_statistics(self.values, self.base, self.source,
                                 seed=int(self.meta.get("seed", 0)))
        self.effect, self.effect_lo = stats["effect"], stats["effect_lo"]
        self.effect_hi, self.p_value = stats["effect_hi"], stats["p_value"]

    @property
    def delta(self) -> Float[Tensor, "*cells batch"]:
        """``values - base`` per prompt: TransformerLens's ``PatchingResult.effect()``."""
        return self.values - self.base

    def mean(self) -> Float[Tensor, "*cells"]:
        """The metric averaged over prompts, per cell (TL's default reduced tensor)."""
        return self.values.mean(-1)

    def to_frame(self) -> pd.DataFrame:
        """One row per cell: its axes, mean metric, mean change, effect with its interval and
        p-value, and the number of prompts."""
        shape = self.values.shape[:-1]
        cells = list(itertools.product(*(range(s) for s in shape)))
        df = pd.DataFrame(cells, columns=list(self.axes))
        df.insert(0, "site", self.site)
        df["metric"] = self.mean().reshape(-1).numpy()
        df["delta"] = self.delta.mean(-1).reshape(-1).numpy()
        for k in ("effect", "effect_lo", "effect_hi", "p_value"):
            df[k] = getattr(self, k).reshape(-1).numpy()
        df["n_prompts"] = self.values.shape[-1]
        return df

    def to_transformer_lens(self):
        """This result as TransformerLens's ``transformer_lens.patching.PatchingResult``
        (per-example values, ``reduced=False``, ``baseline`` = the base run), so its
        ``effect()``, ``bootstrap_ci`` and ``permutation_pvalue`` apply."""
        from transformer_lens.patching import PatchingResult, make_df_from_ranges

        return PatchingResult(
            values=self.values.clone(), axis_names=list(self.axes),
            index_df=make_df_from_ranges(list(self.values.shape[:-1]), list(self.axes)),
            metric_names=[str(self.meta.get("metric", {}).get("name", "metric"))],
            reduced=False, baseline=self.base.clone())

    def __repr__(self) -> str:
        return (f"ActivationPatching(site={self.site!r}, axes={self.axes}, "
                f"values={tuple(self.values.shape)}, direction={self.meta.get('direction')!r}, "
                f"path={self.meta.get('path')!r})")


@dataclass
class PathPatching:
    """Path patching from one sender head (Wang et al. 2022): the sender's output changed to
    its source-run value reaches only the receiver, everything else keeps its base value.

    ``values``: ``[component, layer, head, batch]`` the metric with the path sender -> receiver
    head's ``components[c]`` input (``q``, ``k``, ``v``) patched; NaN where not computed
    (layers up to the sender's; heads past the key/value heads for ``k``/``v`` under
    grouped-query attention, where those receivers are key/value heads). ``logits``: [batch]
    the metric with the direct path sender -> logits patched (NaN when not asked).
    ``pattern_change``: ``[component, layer, head, batch, key_pos]`` the receiver's attention
    row at the read position, patched minus base (a key/value receiver: its first query head).
    ``base``/``source`` [batch] as in :class:`ActivationPatching`; ``effect*``/``p_value``
    ``[component, layer, head]`` and ``logits_effect*`` / ``logits_p`` per :func:`patch_statistics`.
    """

    sender: tuple[int, int]
    components: tuple[str, ...]
    values: Float[Tensor, "component layer head batch"]
    logits: Float[Tensor, " batch"]
    pattern_change: Float[Tensor, "component layer head batch key_pos"]
    base: Float[Tensor, " batch"]
    source: Float[Tensor, " batch"]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        seed = int(self.meta.get("seed", 0))
        s = patch_statistics(self.values, self.base, self.source, seed)
        self.effect, self.effect_lo, self.effect_hi, self.p_value = (
            s["effect"], s["effect_lo"], s["effect_hi"], s["p_value"])
        s = patch_statistics(self.logits[None], self.base, self.source, seed)
        self.logits_effect, self.logits_effect_lo, self.logits_effect_hi, self.logits_p = (
            float(s[k][0]) for k in ("effect", "effect_lo", "effect_hi", "p_value"))

    def to_frame(self) -> pd.DataFrame:
        """One row per receiver (component, layer, head) that was computed, plus one row for
        the logits: mean metric, effect with interval, p-value and the mean total-variation
        change of the receiver's attention row at the read position."""
        rows = []
        C, L, H = self.values.shape[:3]
        tv = 0.5 * self.pattern_change.abs().nansum(-1).mean(-1)  # [component, layer, head]
        for c, layer, h in itertools.product(range(C), range(L), range(H)):
            if torch.isnan(self.values[c, layer, h]).all():
                continue
            rows.append({"receiver": self.components[c], "layer": layer, "head": h,
                         "metric": float(self.values[c, layer, h].mean()),
                         "effect": float(self.effect[c, layer, h]),
                         "effect_lo": float(self.effect_lo[c, layer, h]),
                         "effect_hi": float(self.effect_hi[c, layer, h]),
                         "p_value": float(self.p_value[c, layer, h]),
                         "pattern_tv": float(tv[c, layer, h])})
        if not torch.isnan(self.logits).all():
            rows.append({"receiver": "logits", "layer": None, "head": None,
                         "metric": float(self.logits.mean()), "effect": self.logits_effect,
                         "effect_lo": self.logits_effect_lo, "effect_hi": self.logits_effect_hi,
                         "p_value": self.logits_p, "pattern_tv": float("nan")})
        df = pd.DataFrame(rows)
        df.insert(0, "sender_head", self.sender[1])
        df.insert(0, "sender_layer", self.sender[0])
        return df

    def __repr__(self) -> str:
        return (f"PathPatching(sender={tuple(self.sender)}, components={self.components}, "
                f"direction={self.meta.get('direction')!r}, path={self.meta.get('path')!r})")
