"""Interventions as small frozen values. They hold no hooks; the engine applies them.

* :class:`HeadAblation` replaces one head's output (``hook_z``) at every position (or at the
  positions ``rows`` selects): by zero, by its mean over the prompt set at that position, or by
  its value on the paired corrupted prompt.
* :class:`EdgeEdit` edits one head's attention row(s): ``remove[b, q, s] = True`` sets
  ``alpha[q, s] = 0`` *without renormalising*, which equals subtracting the per-source terms
  ``alpha[q, s] * v[s] @ W_O`` from the head's output. Under a ``baseline`` other than zero the
  removed terms are *replaced* by their baseline counterparts instead: the corrupted prompt's
  ``alpha_c[q, s] * v_c[s]`` (resample) or the prompt-set mean of ``alpha[q, s] * v[s]``
  (mean), so removing every source equals ablating the head under that baseline. With
  ``renormalise=True`` (zero baseline only) the remaining weights of an edited row are rescaled
  to sum to 1 (a secondary variant); when the mass left is below 1e-6 the result is NaN, never
  a blow-up.
* ``Intervention.direct`` replaces heads' outputs in the final residual stream only (their
  direct path to the readout) by the ``direct_baseline`` value (zero: removed), with the final
  norm's scale frozen at its clean value.
* :class:`Intervention` bundles several of them into one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

from ..types import AblationMethod, HeadId

__all__ = [
    "HeadAblation",
    "EdgeEdit",
    "Intervention",
    "ablate",
    "remove_sources",
    "keep_only",
    "remove_direct",
]


@dataclass(frozen=True, eq=False)
class HeadAblation:
    """Replace ``head``'s output by ``method``; ``rows`` ([batch, pos] bool) limits the
    replacement to those positions (None = every position)."""

    head: HeadId
    method: AblationMethod = AblationMethod.ZERO
    rows: Bool[Tensor, "batch pos"] | None = None

    def __post_init__(self):
        object.__setattr__(self, "head", HeadId(*self.head))
        object.__setattr__(self, "method", AblationMethod(self.method))
        if self.rows is not None:
            r = torch.as_tensor(self.rows)
            if r.dtype != torch.bool or r.ndim != 2:
                raise ValueError(
                    f"rows: expected a bool tensor [batch, pos], got {r.dtype} {tuple(r.shape)}"
                )
            object.__setattr__(self, "rows", r)


@dataclass(frozen=True, eq=False)
class EdgeEdit:
    head: HeadId
    remove: Bool[Tensor, "batch query_pos key_pos"]
    renormalise: bool = False
    baseline: AblationMethod = AblationMethod.ZERO

    def __post_init__(self):
        object.__setattr__(self, "head", HeadId(*self.head))
        object.__setattr__(self, "baseline", AblationMethod(self.baseline))
        if self.renormalise and self.baseline != AblationMethod.ZERO:
            raise ValueError(
                "renormalise: only defined for the zero baseline (removed weights are dropped "
                f"and the rest rescaled); got baseline {self.baseline.value!r}"
            )
        r = torch.as_tensor(self.remove)
        if r.dtype != torch.bool or r.ndim != 3:
            raise ValueError(
                f"remove: expected a bool tensor [batch, query_pos, key_pos], got {r.dtype} "
                f"{tuple(r.shape)}"
            )
        object.__setattr__(self, "remove", r)


@dataclass(frozen=True, eq=False)
class Intervention:
    """One forward pass's worth of edits, with a label for tables and checkpoints."""

    label: str
    ablations: tuple[HeadAblation, ...] = ()
    edges: tuple[EdgeEdit, ...] = ()
    direct: tuple[HeadId, ...] = ()
    direct_baseline: AblationMethod = AblationMethod.ZERO

    def __post_init__(self):
        object.__setattr__(self, "direct_baseline", AblationMethod(self.direct_baseline))

    def layers(self) -> set[int]:
        return {a.head.layer for a in self.ablations} | {e.head.layer for e in self.edges}


def ablate(
    *heads,
    method: AblationMethod | str = AblationMethod.ZERO,
    rows: Tensor | None = None,
    label: str | None = None,
) -> Intervention:
    """Ablate ``heads`` by ``method`` at every position, or at the positions ``rows``
    ([batch, pos] bool) selects."""
    abl = tuple(HeadAblation(HeadId(*h), AblationMethod(method), rows) for h in heads)
    name = label or f"ablate[{AblationMethod(method).value}]:" + ",".join(str(a.head) for a in abl)
    return Intervention(name, ablations=abl)


def remove_sources(
    head,
    remove: Tensor,
    *,
    renormalise: bool = False,
    baseline: AblationMethod | str = AblationMethod.ZERO,
    label: str | None = None,
) -> Intervention:
    """Set ``alpha[q, s] = 0`` where ``remove`` is True ([batch, query_pos, key_pos]); under a
    non-zero ``baseline`` the removed terms are replaced by their baseline counterparts."""
    head = HeadId(*head)
    tag = "renorm" if renormalise else "remove"
    edit = EdgeEdit(head, remove, renormalise, AblationMethod(baseline))
    return Intervention(label or f"{tag}:{head}", edges=(edit,))


def remove_direct(
    *heads, baseline: AblationMethod | str = AblationMethod.ZERO, label: str | None = None
) -> Intervention:
    """Replace the heads' direct contribution to the readout by ``baseline`` (zero: remove it),
    with the final norm's scale frozen at its clean value."""
    hs = tuple(HeadId(*h) for h in heads)
    name = label or "direct:" + ",".join(map(str, hs))
    return Intervention(name, direct=hs, direct_baseline=AblationMethod(baseline))


def keep_only(
    head,
    keep: Tensor,
    rows: Tensor | None = None,
    *,
    baseline: AblationMethod | str = AblationMethod.ZERO,
    label: str | None = None,
) -> Intervention:
    """Remove every source outside ``keep`` ([batch, query_pos, key_pos]) on the query rows
    selected by ``rows`` ([batch, query_pos]; default all rows)."""
    head = HeadId(*head)
    remove = ~keep
    if rows is not None:
        remove = remove & rows[:, :, None]
    edit = EdgeEdit(head, remove, baseline=AblationMethod(baseline))
    return Intervention(label or f"keep:{head}", edges=(edit,))
