"""How a patching sweep is cut into forward passes, and where its results are saved.

* :func:`plan_chunks` - cells of one reach (site, layer, first position) run together, at most
  ``batch_size`` rows (prompt x cell) per forward and, under a ``memory_budget`` (bytes of
  working memory per forward), as many rows as fit: when one cell on every prompt does not
  fit, its prompts are split over several forwards. A budget too small for one row is refused
  before any forward, naming the minimum.
* :func:`open_store` - the :class:`~.checkpoint.EvidenceStore` of a sweep: its run key holds
  everything that changes the numbers (model config and weights, prompts with their corrupted
  version, metric, method, direction, site, forward path, sender); each cell is keyed by
  :func:`~.interventions.digest` of the :class:`~.patch_runs.Cell` (what it patches).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import EvidenceStore
from .interventions import digest
from .memory import position_bytes
from .run_identity import metric_identity, prompts_digest

if TYPE_CHECKING:
    from .patch_runs import Cell, PatchRuns

__all__ = ["plan_chunks", "open_store", "position_bytes", "check_budget", "PATCH_SEMANTICS"]

# bump when the numbers a patching cell computes change meaning: older checkpoints are not reused
PATCH_SEMANTICS = 1


def check_budget(memory_budget) -> int | None:
    """``memory_budget`` as a positive int (bytes), or None; a clear error otherwise."""
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int | float) or (
            memory_budget != int(memory_budget)) or int(memory_budget) < 1:
        raise ValueError("memory_budget: expected a positive number of bytes (or None), got "
                         f"{memory_budget!r}")
    return int(memory_budget)


def row_positions(runs: PatchRuns, cell: Cell) -> int:
    """Positions one row of ``cell`` runs: from its first reachable position on (hook-free
    forward), or all of them (bridge)."""
    p = runs.prompts.n_pos
    return p if runs.bare is None else p - min(runs.reach(cell)[1], p - 1)


def plan_chunks(runs: PatchRuns, cells: list[Cell], todo: list[int]
                ) -> list[tuple[list[int], slice]]:
    """The forwards for cells ``todo`` (indices into ``cells``): each a list of cells of one
    reach and the prompts they run on (a slice; all prompts unless the budget splits them)."""
    n, budget = runs.n, runs.memory_budget
    groups: dict = {}
    for k in todo:
        c = cells[k]
        key = (c.site, c.layer, runs.reach(c)) if runs.bare is not None else (c.site, c.layer)
        groups.setdefault(key, []).append(k)
    bpp = position_bytes(runs.adapter, runs.prompts.n_pos)
    if budget is not None and groups:
        q = max(row_positions(runs, cells[ks[0]]) for ks in groups.values())
        if budget < bpp * q:
            raise ValueError(
                f"memory_budget: {budget} bytes cannot hold one row (one prompt x one cell, "
                f"{q} positions) of this sweep: it needs at least {bpp * q} bytes; raise it or "
                "leave it unset")
    per = max(1, runs.batch_size // n)  # cells per forward
    out: list[tuple[list[int], slice]] = []
    for ks in groups.values():
        rows = per * n if budget is None else budget // (bpp * row_positions(runs, cells[ks[0]]))
        if rows >= n:
            step = min(per, rows // n)
            out += [(ks[i: i + step], slice(0, n)) for i in range(0, len(ks), step)]
        else:  # one cell on every prompt does not fit: split its prompts
            out += [([k], slice(s, min(s + rows, n))) for k in ks for s in range(0, n, rows)]
    return out


def open_store(runs: PatchRuns, checkpoint: str | Path | None, method: str, site: str,
               sender: tuple[int, int] | None = None) -> EvidenceStore | None:
    """The checkpoint of one sweep (None without a file). Results of other runs in the file are
    kept; when none of this run is there, a warning says which component differs."""
    if checkpoint is None:
        return None
    a = runs.adapter
    parts = {
        "config": a.config_hash(),
        "weights": a.weights_hash(),
        "prompts": prompts_digest(runs.prompts),
        "metric": digest(metric_identity(runs.metric)),
        "engine": digest({"semantics": PATCH_SEMANTICS}),
        "method": method,
        "direction": runs.direction,
        "site": site,
        "path": runs.path,
        "sender": "none" if sender is None else f"{sender[0]}.{sender[1]}",
    }
    return EvidenceStore(parts, checkpoint)
