"""Typed names of the evidence: what an intervention measured, as a frozen key that the sweeps
(evidence) construct and the judgement (comparison) looks up.

A key is ``(kind, heads, baseline, source, row)``: the kind of edit (:class:`Kind`), the heads it
edits, the baseline whose terms replace what it removes, the examined source's index (single
edges) and the query row (row-by-row ablations). Keys are checked when made: an unknown kind, a
missing baseline or a source index on a kind that has none is a :class:`ValueError` naming the
field, so a typo cannot become a silently empty (NaN) column. ``str(key)`` is the display label
of the tables and progress bars (``keep-resample:0.1``, ``edge-zero:1.2@3``), unchanged from the
labels lensattr used before keys existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..core.types import AblationMethod, HeadId

__all__ = ["Kind", "EvidenceKey", "key"]


class Kind(str, Enum):
    """What an intervention (or a statistic computed from interventions) measures."""

    ABLATE = "ablate"  # the head ablated at every position
    READ = "read"  # ablated at the metric's read rows only
    OTHER = "other"  # ablated at every other row only
    ROW = "row"  # ablated at one query row (``row``)
    KEEP = "keep"  # keep only the claimed set C (every other source removed, the sink too)
    REMOVE = "remove"  # remove C (necessity)
    SINK = "sink"  # remove the sink's terms
    RENORM = "renorm"  # remove C at the read rows and renormalise (zero baseline only)
    DIRECT = "direct"  # the head's direct path to the readout replaced
    EDGE = "edge"  # one edge (read rows -> examined source ``source``) removed
    PATTERN = "pattern"  # that edge's weight replaced by the baseline's, values kept
    PATTERN_READ = "pattern-read"  # the whole read row's weights replaced, values kept
    LOCUS_EDGE = "locus-edge"  # an edge at the row where the head's effect lives
    JOINT = "joint"  # two heads ablated together
    REFERENCE = "reference"  # every head zero-ablated: the effect scale without corrupted prompts
    # statistics derived from the interventions above (names of their estimates)
    RHO = "rho"
    SINK_SHARE = "sinkshare"
    NECESSITY = "necessity"
    INTERACTION = "inter"
    DIRECT_SHARE = "dmt"


_SOURCED = {Kind.EDGE, Kind.PATTERN, Kind.LOCUS_EDGE}
_NO_BASELINE = {Kind.RENORM, Kind.REFERENCE}
_PAIRS = {Kind.JOINT, Kind.INTERACTION}


@dataclass(frozen=True)
class EvidenceKey:
    """One piece of evidence, by what it does; hashable, comparable, checked when made."""

    kind: Kind
    heads: tuple[HeadId, ...] = ()
    baseline: AblationMethod | None = None
    source: int | None = None
    row: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        try:
            set_(self, "kind", Kind(self.kind))
        except ValueError:
            known = ", ".join(k.value for k in Kind)
            raise ValueError(f"kind: unknown evidence kind {self.kind!r}; expected one of "
                             f"{known}") from None
        set_(self, "heads", tuple(HeadId(*h) for h in self.heads))
        if self.baseline is not None:
            set_(self, "baseline", AblationMethod(self.baseline))
        k = self.kind
        if k == Kind.REFERENCE:
            if self.heads or self.baseline is not None:
                raise ValueError("heads, baseline: the reference run names neither")
        elif len(self.heads) != (2 if k in _PAIRS else 1):
            n = 2 if k in _PAIRS else 1
            raise ValueError(f"heads: {k.value!r} evidence is about {n} head(s), got "
                             f"{len(self.heads)}")
        if (self.baseline is None) != (k in _NO_BASELINE):
            need = "takes no" if k in _NO_BASELINE else "needs a"
            raise ValueError(f"baseline: {k.value!r} evidence {need} baseline")
        if (self.source is None) == (k in _SOURCED):
            need = "needs" if k in _SOURCED else "takes no"
            raise ValueError(f"source: {k.value!r} evidence {need} an examined source index")
        if (self.row is None) == (k == Kind.ROW):
            need = "needs" if k == Kind.ROW else "takes no"
            raise ValueError(f"row: {k.value!r} evidence {need} a query row")

    def __str__(self) -> str:
        k, b = self.kind, self.baseline.value if self.baseline is not None else ""
        if k == Kind.REFERENCE:
            return "reference:all-zero"
        if k == Kind.ABLATE:
            name = b
        elif k == Kind.RENORM:
            name = "renorm"
        elif k == Kind.ROW:
            name = f"row{self.row}-{b}"
        else:
            name = f"{k.value}-{b}"
        heads = "+".join(f"{h.layer}.{h.head}" for h in self.heads)
        return f"{name}:{heads}" + (f"@{self.source}" if self.source is not None else "")


def key(kind: Kind | str, *heads: HeadId, baseline: AblationMethod | str | None = None,
        source: int | None = None, row: int | None = None) -> EvidenceKey:
    """``EvidenceKey(kind, heads, baseline, source, row)``, heads given positionally."""
    return EvidenceKey(kind, tuple(heads), baseline, source, row)  # type: ignore[arg-type]
    # (kind and baseline are converted, and checked, by EvidenceKey itself)
