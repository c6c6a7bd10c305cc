"""Which heads get the costly evidence that no verdict rule reads: the single-edge sweep.

A head's single-edge removals (one per examined source, ~24 interventions) locate where its
effect comes from (``carriers``, the edges table, claim-vs-edge agreement); :func:`decide`
reads none of them. A head whose exact primary-baseline effect is shown to be inside the null
margin (its 95% interval lies within ±delta) has no effect to locate, so under
``screen="auto"`` its edges are not measured: they are NaN in the tables and the head is listed
in ``meta["screening"]`` with the reason. The verdicts are those of the exhaustive audit
(``screen="none"``) by construction; every head keeps its exact ablations under every baseline,
its keep-only/remove edits and its partner search.
"""

from __future__ import annotations

import math

from .compare.judge import Effects
from .compare.verdicts import Thresholds
from .evidence.sweeps import label
from .types import AblationMethod, HeadId

__all__ = ["SCREENS", "edge_screen"]

SCREENS = ("auto", "none")


def edge_screen(
    heads: list[HeadId], eff: Effects, primary: AblationMethod, th: Thresholds, screen: str
) -> tuple[list[HeadId], dict]:
    """(heads whose single edges are measured, the record for ``meta["screening"]``)."""
    if screen not in SCREENS:
        raise ValueError(f"screen: expected one of {SCREENS}, got {screen!r}")
    skipped = []
    if screen == "auto":
        for h in heads:
            e = eff(label(primary.value, h))
            bounded = math.isfinite(e.lo) and math.isfinite(e.hi)
            if bounded and -th.delta <= e.lo and e.hi <= th.delta:
                skipped.append(h)
    keep = [h for h in heads if h not in skipped]
    record = {
        "screen": screen,
        "edges_not_measured": [list(h) for h in skipped],
        "rule": f"a head's single-edge sweep is skipped when its exact {primary.value} effect's "
        f"95% interval lies inside the null margin ±{th.delta} (nothing to locate); no "
        "verdict rule reads single edges, so verdicts equal the exhaustive audit's",
    }
    return keep, record
