"""The task registry: prompts (+ corrupted prompts, answers, roles), a metric, a default model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .metrics import LogitDiff, Metric
from .prompts import PromptSet

__all__ = ["Task", "register_task", "get", "list_tasks"]


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    model: str  # the bundled model the task is made for
    mechanism: str  # the expected mechanism, in words
    make_prompts: Callable[[int, int], PromptSet]  # (n_prompts, seed) -> PromptSet
    make_metric: Callable[[], Metric]
    default_n: int = 32

    def prompts(self, n_prompts: int | None = None, seed: int = 0) -> PromptSet:
        n = self.default_n if n_prompts is None else int(n_prompts)
        if n < 1:
            raise ValueError(f"n_prompts: expected at least 1, got {n}")
        return self.make_prompts(n, seed)

    def metric(self) -> Metric:
        return self.make_metric()


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Register a task; refuses duplicates."""
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def get(name: str) -> Task:
    if name not in _TASKS:
        raise KeyError(f"task: unknown task {name!r}; available: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def list_tasks() -> list[Task]:
    return list(_TASKS.values())


def _planted_copy(n: int, seed: int) -> PromptSet:
    from .zoo.planted import planted_copy_data

    d = planted_copy_data(n_prompts=n, seed=seed)
    return PromptSet(
        tokens=d["clean"],
        corrupted=d["corrupted"],
        answers=d["answer"],
        wrong=d["wrong"],
        roles=d["roles"],
        text=tuple(d["text"]),
        name="planted-copy",
    )


register_task(
    Task(
        name="planted-copy",
        description="Copy the first name (S1) at '?' over the second name (S2); corrupted prompts "
        "replace S1 by a third name.",
        model="planted",
        mechanism="L0H0 copies S1 (faithful); L0H1 attends a zero-value token but copies S1 "
        "through 15% attention (misleading); L0H3 copies S1 and L1H0 backs it up only when it is "
        "absent (compensated pair); L0H2 sink, L1H1 previous-token and L1H3 self heads are "
        "inert; L1H2 is diffuse and negligible.",
        make_prompts=_planted_copy,
        make_metric=lambda: LogitDiff("END"),
    )
)
