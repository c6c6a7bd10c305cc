"""Interventions as small frozen values. They hold no hooks; the engine applies them.

* :class:`HeadAblation` replaces one head's output (``hook_z``) at every position: by zero, by
  its mean over the prompt set at that position, or by its value on the paired corrupted prompt.
* :class:`EdgeEdit` edits one head's attention row(s): ``remove[b, q, s] = True`` sets
  ``alpha[q, s] = 0`` *without renormalising*, which equals subtracting the per-source terms
  ``alpha[q, s] * v[s] @ W_O`` from the head's output. With ``renormalise=True`` the remaining
  weights of an edited row are rescaled to sum to 1 (a secondary variant); when the mass left is
  below 1e-6 the result is NaN, never a blow-up.
* ``Intervention.direct`` removes heads' outputs from the final residual stream only (their
  direct path to the readout), with the final norm's scale frozen at its clean value.
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


@dataclass(frozen=True)
class HeadAblation:
    head: HeadId
    method: AblationMethod = AblationMethod.ZERO

    def __post_init__(self):
        object.__setattr__(self, "head", HeadId(*self.head))
        object.__setattr__(self, "method", AblationMethod(self.method))


@dataclass(frozen=True, eq=False)
class EdgeEdit:
    head: HeadId
    remove: Bool[Tensor, "batch query_pos key_pos"]
    renormalise: bool = False

    def __post_init__(self):
        object.__setattr__(self, "head", HeadId(*self.head))
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

    def layers(self) -> set[int]:
        return {a.head.layer for a in self.ablations} | {e.head.layer for e in self.edges}


def ablate(
    *heads, method: AblationMethod | str = AblationMethod.ZERO, label: str | None = None
) -> Intervention:
    abl = tuple(HeadAblation(HeadId(*h), AblationMethod(method)) for h in heads)
    name = label or f"ablate[{AblationMethod(method).value}]:" + ",".join(str(a.head) for a in abl)
    return Intervention(name, ablations=abl)


def remove_sources(
    head, remove: Tensor, *, renormalise: bool = False, label: str | None = None
) -> Intervention:
    """Set ``alpha[q, s] = 0`` where ``remove`` is True ([batch, query_pos, key_pos])."""
    head = HeadId(*head)
    tag = "renorm" if renormalise else "remove"
    return Intervention(label or f"{tag}:{head}", edges=(EdgeEdit(head, remove, renormalise),))


def remove_direct(*heads, label: str | None = None) -> Intervention:
    """Remove the heads' direct contribution to the readout (final norm scale frozen)."""
    hs = tuple(HeadId(*h) for h in heads)
    return Intervention(label or "direct:" + ",".join(map(str, hs)), direct=hs)


def keep_only(
    head, keep: Tensor, rows: Tensor | None = None, *, label: str | None = None
) -> Intervention:
    """Zero every source outside ``keep`` ([batch, query_pos, key_pos]) on the query rows
    selected by ``rows`` ([batch, query_pos]; default all rows)."""
    head = HeadId(*head)
    remove = ~keep
    if rows is not None:
        remove = remove & rows[:, :, None]
    return Intervention(label or f"keep:{head}", edges=(EdgeEdit(head, remove),))
