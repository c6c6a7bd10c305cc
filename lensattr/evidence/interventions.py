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
  a blow-up. With ``weights_only=True`` (mean or resample baseline) only the attention
  *weights* of the edited entries are replaced, ``alpha[q, s] := alpha_c[q, s]`` (resample) or
  the prompt-set mean of ``alpha[q, s]`` (mean), while the run's own values are kept: the
  pattern patching of those entries (TransformerLens's ``hook_pattern`` patching, noising),
  which says whether *where* the head looks matters, apart from *what* it reads there.
* ``Intervention.direct`` replaces heads' outputs in the final residual stream only (their
  direct path to the readout) by the ``direct_baseline`` value (zero: removed), with the final
  norm's scale frozen at its clean value.
* :class:`Intervention` bundles several of them into one forward pass.

Identity: :func:`digest` fingerprints what a value *does*, generically over its dataclass
fields (tensors by dtype, shape and bytes; fields marked ``unordered`` as multisets; fields
marked ``identity=False``, such as an intervention's display label, left out), so a field added
later is part of the identity without further code. Results and checkpoints are keyed by
``Intervention.digest()``, never by the label.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from enum import Enum

import torch
from jaxtyping import Bool
from torch import Tensor

from ..core.names import stable_name
from ..core.types import AblationMethod, HeadId
from .keys import EvidenceKey

__all__ = [
    "HeadAblation",
    "EdgeEdit",
    "Intervention",
    "ablate",
    "remove_sources",
    "keep_only",
    "remove_direct",
    "patch_weights",
    "digest",
]

# field metadata: left out of the digest (display only) / compared as a multiset / left out
# while at its default (a field added later keeps the digests, and checkpoints, of the values
# that do not use it)
_DISPLAY_ONLY = {"identity": False}
_UNORDERED = {"unordered": True}
_OMIT_DEFAULT = {"omit_default": True}


def digest(value) -> str:
    """A sha256 fingerprint (32 hex digits) of what ``value`` is, bit for bit.

    Dataclasses by type name and every field (except those with ``metadata["identity"] is
    False``; fields with ``metadata["unordered"]`` compare as multisets), tensors by dtype,
    shape and raw bytes, dicts and sets order-insensitively, sequences in order, enums by type
    and value, floats exactly; fields with ``metadata["omit_default"]`` only when they differ
    from their default. Other types raise TypeError rather than be guessed at."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()[:32]


def _put(h, tag: bytes, payload: bytes = b"") -> None:
    h.update(tag + len(payload).to_bytes(8, "little") + payload)


def _feed(h, x) -> None:  # one branch per kind of value
    if x is None:
        _put(h, b"N")
    elif isinstance(x, bool):
        _put(h, b"B", b"1" if x else b"0")
    elif isinstance(x, Enum):
        _put(h, b"M", stable_name(type(x)).encode())
        _feed(h, x.value)
    elif isinstance(x, int):
        _put(h, b"I", str(int(x)).encode())
    elif isinstance(x, float):
        _put(h, b"F", float(x).hex().encode())
    elif isinstance(x, str):
        _put(h, b"S", x.encode())
    elif isinstance(x, bytes):
        _put(h, b"Y", x)
    elif isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous().reshape(-1)
        _put(h, b"T", f"{t.dtype}|{tuple(x.shape)}".encode())
        _put(h, b"", t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        _put(h, b"D", stable_name(type(x)).encode())
        for f in dataclasses.fields(x):
            v = getattr(x, f.name)
            if f.metadata.get("omit_default") and v == f.default:
                continue
            if f.metadata.get("identity", True):
                _put(h, b"f", f.name.encode())
                if f.metadata.get("unordered"):
                    _feed_unordered(h, v)
                else:
                    _feed(h, v)
        _put(h, b"d")
    elif isinstance(x, dict):
        _put(h, b"K", str(len(x)).encode())
        for kd, vd in sorted((digest(k), digest(v)) for k, v in x.items()):
            _put(h, b"k", kd.encode() + vd.encode())
    elif isinstance(x, (set, frozenset)):
        _feed_unordered(h, x)
    elif isinstance(x, (tuple, list)):
        kind = type(x) if hasattr(x, "_fields") else tuple  # NamedTuples (HeadId) by name
        _put(h, b"L", f"{stable_name(kind)}|{len(x)}".encode())
        for v in x:
            _feed(h, v)
    else:
        raise TypeError(
            f"digest: cannot fingerprint a {type(x).__name__}; intervention fields must be "
            "tensors, numbers, strings, enums, None, dataclasses or containers of these"
        )


def _feed_unordered(h, items) -> None:
    subs = sorted(digest(v) for v in items)
    _put(h, b"U", str(len(subs)).encode())
    for d in subs:
        _put(h, b"u", d.encode())


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
    """Edit one head's attention rows; ``remove`` is ``[batch, query_pos, key_pos]`` bool.
    ``weights_only``: replace only the weights of those entries by the baseline's (see the
    module docstring), keeping the run's values."""

    head: HeadId
    remove: Bool[Tensor, "batch query_pos key_pos"]
    renormalise: bool = False
    baseline: AblationMethod = AblationMethod.ZERO
    weights_only: bool = field(default=False, metadata=_OMIT_DEFAULT)

    def __post_init__(self):
        object.__setattr__(self, "head", HeadId(*self.head))
        object.__setattr__(self, "baseline", AblationMethod(self.baseline))
        object.__setattr__(self, "weights_only", bool(self.weights_only))
        if self.renormalise and self.baseline != AblationMethod.ZERO:
            raise ValueError(
                "renormalise: only defined for the zero baseline (removed weights are dropped "
                f"and the rest rescaled); got baseline {self.baseline.value!r}"
            )
        if self.weights_only and self.baseline == AblationMethod.ZERO:
            raise ValueError(
                "weights_only: needs a replacement baseline ('mean' or 'resample'); under the "
                "zero baseline replacing the weights by zero is removing the edges (use "
                "weights_only=False)"
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
    """One forward pass's worth of edits, with a label to display.

    The label is a name for tables only: results are keyed by :meth:`digest`, what the edits
    do. The order of ``ablations``, ``edges`` and ``direct`` does not matter (edits of one
    layer are combined; direct paths are summed), so the digest treats them as multisets; two
    ablations of one head at overlapping positions, where the order would matter, are refused.
    """

    label: str = field(metadata=_DISPLAY_ONLY)
    ablations: tuple[HeadAblation, ...] = field(default=(), metadata=_UNORDERED)
    edges: tuple[EdgeEdit, ...] = field(default=(), metadata=_UNORDERED)
    direct: tuple[HeadId, ...] = field(default=(), metadata=_UNORDERED)
    direct_baseline: AblationMethod = AblationMethod.ZERO
    # the typed name the sweeps give it (lensattr.evidence.keys); display only, like the label
    key: EvidenceKey | None = field(default=None, metadata=_DISPLAY_ONLY)

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "ablations", tuple(self.ablations))
        set_(self, "edges", tuple(self.edges))
        set_(self, "direct", tuple(HeadId(*h) for h in self.direct))
        set_(self, "direct_baseline", AblationMethod(self.direct_baseline))
        for i, a in enumerate(self.ablations):
            for b in self.ablations[i + 1 :]:
                if a.head == b.head and (
                    a.rows is None or b.rows is None or bool((a.rows & b.rows).any())
                ):  # which replacement wins would depend on the order
                    raise ValueError(
                        f"ablations: {self.label!r} ablates head {a.head} twice at the same "
                        "positions; give each head one ablation per position"
                    )

    def digest(self) -> str:
        """Fingerprint of what this intervention does (every field but the label)."""
        return digest(self)

    def layers(self) -> set[int]:
        return {a.head.layer for a in self.ablations} | {e.head.layer for e in self.edges}


def ablate(
    *heads,
    method: AblationMethod | str = AblationMethod.ZERO,
    rows: Tensor | None = None,
    label: str | EvidenceKey | None = None,
) -> Intervention:
    """Ablate ``heads`` by ``method`` at every position, or at the positions ``rows``
    ([batch, pos] bool) selects."""
    abl = tuple(HeadAblation(HeadId(*h), AblationMethod(method), rows) for h in heads)
    name = f"ablate[{AblationMethod(method).value}]:" + ",".join(str(a.head) for a in abl)
    name, key = _named(label, name)
    return Intervention(name, ablations=abl, key=key)


def remove_sources(
    head,
    remove: Tensor,
    *,
    renormalise: bool = False,
    baseline: AblationMethod | str = AblationMethod.ZERO,
    label: str | EvidenceKey | None = None,
) -> Intervention:
    """Set ``alpha[q, s] = 0`` where ``remove`` is True ([batch, query_pos, key_pos]); under a
    non-zero ``baseline`` the removed terms are replaced by their baseline counterparts."""
    head = HeadId(*head)
    tag = "renorm" if renormalise else "remove"
    edit = EdgeEdit(head, remove, renormalise, AblationMethod(baseline))
    name, key = _named(label, f"{tag}:{head}")
    return Intervention(name, edges=(edit,), key=key)


def patch_weights(
    head,
    entries: Tensor,
    *,
    baseline: AblationMethod | str = AblationMethod.RESAMPLE,
    label: str | EvidenceKey | None = None,
) -> Intervention:
    """Replace the attention weights ``alpha[q, s]`` of ``head`` where ``entries`` is True
    ([batch, query_pos, key_pos]) by the baseline's (``resample``: the corrupted prompt's
    weights; ``mean``: their mean over the prompt set), keeping the run's values and the other
    weights as they are (no renormalising): pattern patching of those entries."""
    head = HeadId(*head)
    edit = EdgeEdit(head, entries, baseline=AblationMethod(baseline), weights_only=True)
    name, key = _named(label, f"weights:{head}")
    return Intervention(name, edges=(edit,), key=key)


def remove_direct(
    *heads, baseline: AblationMethod | str = AblationMethod.ZERO,
    label: str | EvidenceKey | None = None,
) -> Intervention:
    """Replace the heads' direct contribution to the readout by ``baseline`` (zero: remove it),
    with the final norm's scale frozen at its clean value."""
    hs = tuple(HeadId(*h) for h in heads)
    name, key = _named(label, "direct:" + ",".join(map(str, hs)))
    return Intervention(name, direct=hs, direct_baseline=AblationMethod(baseline), key=key)


def keep_only(
    head,
    keep: Tensor,
    rows: Tensor | None = None,
    *,
    baseline: AblationMethod | str = AblationMethod.ZERO,
    label: str | EvidenceKey | None = None,
) -> Intervention:
    """Remove every source outside ``keep`` ([batch, query_pos, key_pos]) on the query rows
    selected by ``rows`` ([batch, query_pos]; default all rows)."""
    head = HeadId(*head)
    remove = ~keep
    if rows is not None:
        remove = remove & rows[:, :, None]
    edit = EdgeEdit(head, remove, baseline=AblationMethod(baseline))
    name, key = _named(label, f"keep:{head}")
    return Intervention(name, edges=(edit,), key=key)


def _named(label: str | EvidenceKey | None, default: str) -> tuple[str, EvidenceKey | None]:
    """(display label, key): a key names the intervention by its ``str``."""
    if isinstance(label, EvidenceKey):
        return str(label), label
    return label or default, None
