"""Chunk planning of the batched engine: which interventions share one forward pass.

A mixin of :class:`lensattr.evidence.engine.Engine`. An intervention's *reach* is the first
layer and the first query position it edits: nothing before either can change in a causal
model, so the hook-free forward (:mod:`.bare`) runs a chunk of one reach from there, and the
chunk's size is counted in the positions its rows run, within ``memory_budget``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from ..core.metric import Readout
    from ..core.prompts import PromptSet
    from ..models.adapter import Adapter
    from .bare import BareForward
    from .interventions import Intervention

__all__ = ["ChunkPlan"]


class ChunkPlan:
    # the engine's state these methods read (set by Engine.__init__)
    adapter: Adapter
    prompts: PromptSet
    readout: Readout
    batch_size: int
    memory_budget: int | None
    _bare: BareForward | None
    _bytes_per_position: int

    def _read_pos(self, readout: Readout) -> Tensor:
        if readout.positions is not None:
            return readout.positions
        return self.prompts.roles["END"]

    def _chunks(self, ivs: list[Intervention], order: list[int]) -> list[list[int]]:
        """Interventions to run together, within ``memory_budget``. On the bridge:
        ``batch_size`` rows per chunk. On the hook-free forward: interventions of one reach
        (first layer, first position) together, as many as ``batch_size`` full-length rows'
        worth of positions (an edit of the read row alone costs one position per row)."""
        n, p = len(self.prompts), self.prompts.n_pos
        if self._bare is None:
            per = max(1, min(self.batch_size, self._budget_positions() // p) // n)
            return [order[i : i + per] for i in range(0, len(order), per)]
        out: list[list[int]] = []
        last = None
        for k in order:
            reach = self._reach(ivs[k])
            q = p - min(reach[1], p - 1)  # positions each row runs
            per = max(1, min(self.batch_size * p, self._budget_positions()) // (q * n))
            if reach != last or len(out[-1]) >= per:
                out.append([])
            out[-1].append(k)
            last = reach
        return out

    def _budget_positions(self) -> int:
        """How many (row, position) pairs of the hook-free forward fit ``memory_budget``."""
        if self.memory_budget is None:
            return 1 << 62
        return self.memory_budget // self._bytes_per_position

    def _reach(self, iv: Intervention) -> tuple[int, int]:
        """(first layer, first query position) that ``iv`` edits: nothing before either can
        change in a causal model. Direct paths edit only the final residual; the read
        positions are always included."""
        a, first = self.adapter, int(self._read_pos(self.readout).min())
        layer = min(iv.layers(), default=a.n_layers)
        for ab in iv.ablations:
            if ab.rows is None:
                return layer, 0
            hit = ab.rows.any(0).nonzero()
            first = min(first, int(hit[0]) if len(hit) else first)
        for e in iv.edges:
            hit = e.remove.any(0).any(-1).nonzero()  # query positions with a removed edge
            first = min(first, int(hit[0]) if len(hit) else first)
        return layer, first
