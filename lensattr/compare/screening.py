"""Which heads get the evidence that only describes where an effect lives.

Every head gets its exact ablation under every baseline, its direct path and its partner
search: the verdict rules read those. The routing edits (keep only / remove the claimed set,
the sink's terms, the renormalised knockout), the read-row / other-row split, the single-edge
sweep (~24 interventions a head) and its pattern patching (as many, plus the read row) locate
an effect; the verdict reads them only through the routing ratio, which is defined only for a
head whose effect under that baseline clears the null margin
(:func:`lensattr.compare.judge._routing`: nothing to route otherwise), and the carriers and
effect locus are empty for such heads too. So under ``screen="auto"`` a head whose effect
under baseline ``m`` does not clear ±delta gets no routing edits under ``m``, and a head whose
primary effect does not clear it gets no split, no single edges and no pattern patching: their
numbers are NaN in the tables and the heads are listed in ``meta["screening"]``. The verdicts
(every baseline's) equal the exhaustive audit's (``screen="none"``) by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.types import AblationMethod, HeadId
from ..evidence.keys import Kind, key
from .judge import Effects
from .verdicts import Thresholds

__all__ = ["SCREENS", "Screen", "screen_heads"]

SCREENS = ("auto", "none")


@dataclass
class Screen:
    """``located[m]``: the heads that get routing edits under baseline ``m`` (under the
    primary baseline also the split and single edges); ``record`` for ``meta``."""

    located: dict[str, list[HeadId]]
    record: dict


def screen_heads(heads: list[HeadId], eff: Effects, methods: list[AblationMethod],
                 primary: AblationMethod, th: Thresholds, screen: str) -> Screen:
    if screen not in SCREENS:
        raise ValueError(f"screen: expected one of {SCREENS}, got {screen!r}")
    located = {}
    for m in methods:
        if screen == "none":
            located[m.value] = list(heads)
            continue
        located[m.value] = [h for h in heads if _clears(eff(key(Kind.ABLATE, h, baseline=m)), th)]
    record = {
        "screen": screen,
        "not_located": {b: [list(h) for h in heads if h not in hs]
                        for b, hs in located.items()},
        "rule": f"under each baseline, a head whose exact effect does not clear the null "
        f"margin ±{th.delta} (its 95% interval is not wholly beyond it) gets no routing edits "
        f"(keep-only, remove, sink, renormalised knockout); under the primary ({primary.value}) "
        "also no read/other-row split, no single-edge sweep and no pattern patching (edges "
        "and read row). No verdict reads these for "
        "such a head (its routing ratio is undefined), so the verdicts equal the exhaustive "
        "audit's; their table entries are NaN",
    }
    return Screen(located, record)


def _clears(e, th: Thresholds) -> bool:
    return e.lo > th.delta or e.hi < -th.delta
