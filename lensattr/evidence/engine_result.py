"""The result record of :meth:`lensattr.evidence.engine.Engine.run`."""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxtyping import Float
from torch import Tensor

__all__ = ["EngineResult"]


@dataclass
class EngineResult:
    """Per-prompt metric values of each intervention.

    values: ``[intervention, batch]`` metric on each prompt (NaN where an intervention was not
        computable, e.g. renormalised knockout with no mass left).
    head_delta: ``[intervention, layer, head_index]`` norm of the change of every head's
        output (z @ W_O) at the metric's read position, averaged over the prompts, or None when
        not tracked. Averaged in the forward, so tracking costs heads x heads, not x prompts.
    digests: each intervention's :meth:`~.Intervention.digest` (what keyed its result).
    n_reused: how many results came from the cache or checkpoint instead of a forward pass.
    All tensors are on the CPU.
    """

    labels: list[str]
    values: Float[Tensor, "intervention batch"]
    head_delta: Float[Tensor, "intervention layer head_index"] | None = None
    digests: list[str] = field(default_factory=list)
    n_reused: int = 0

    def __getitem__(self, label: str) -> Tensor:
        return self.values[self.labels.index(label)]
