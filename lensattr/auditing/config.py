"""The audit's options, grouped: what to audit and judge (:class:`AuditConfig`) and how its
interventions run (:class:`~lensattr.core.config.RunConfig`, shared with the engine, patching
and AtP). :func:`lensattr.audit` takes either ``config=`` or today's keyword arguments (or both:
keywords override the config's fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..compare.verdicts import Thresholds
from ..core.config import RunConfig

__all__ = ["AuditConfig", "RunConfig"]


@dataclass(frozen=True)
class AuditConfig:
    """What the audit measures and how it judges; see :func:`lensattr.audit` for each field.

    ``ablation``: primary baseline (None: resample, else mean, else zero); ``n_prompts``: how
    many prompts (None: the task's own number); ``heads``: the heads audited (None: all);
    ``screen``: ``"auto"`` or ``"none"``; ``claims``: claim sources (None: the default set);
    ``run``: how the interventions run."""

    ablation: str | None = None
    n_prompts: int | None = None
    seed: int = 0
    thresholds: Thresholds = field(default_factory=Thresholds)
    max_edge_sources: int = 24
    heads: object = None
    screen: str = "auto"
    claims: object = None
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.thresholds, Thresholds):
            raise TypeError(f"thresholds: expected lensattr.Thresholds, got "
                            f"{type(self.thresholds).__name__}")
        if not isinstance(self.run, RunConfig):
            raise TypeError(f"run: expected a RunConfig, got {type(self.run).__name__}")
