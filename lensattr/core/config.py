"""Options grouped by what they decide, shared across the stages that take them.

:class:`RunConfig` says how interventions run (batch size, hook-free path, progress bar,
checkpoint file, memory budget): the same fields for :func:`lensattr.audit`, the
:class:`~lensattr.evidence.engine.Engine`, activation / path patching and AtP. A field left
``None`` takes the function's own default (their batch sizes differ, by what one row costs).
Keyword arguments given to a function override its config's fields, so
``audit(model, task, config=cfg, seed=3)`` changes only the seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunConfig", "merge", "run_options"]


@dataclass(frozen=True)
class RunConfig:
    """How interventions run. ``None``: the called function's default."""

    batch_size: int | None = None
    fast: bool | None = None
    progress: bool | None = None
    checkpoint: str | Path | None = None
    memory_budget: int | None = None

    def options(self, **defaults: Any) -> dict[str, Any]:
        """The fields as keyword arguments, ``defaults`` filling those left ``None``; only the
        fields named in ``defaults`` (a function takes the ones it has)."""
        out = {}
        for name, default in defaults.items():
            if name not in _RUN_FIELDS:
                raise TypeError(f"RunConfig has no field {name!r}")
            v = getattr(self, name)
            out[name] = default if v is None else v
        return out


_RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def merge(config, kind: type, given: dict[str, Any]):
    """``config`` (an instance of ``kind``, or None for its defaults) with the keyword
    arguments in ``given`` that are not None put in its place. A config of the wrong type is a
    TypeError naming the argument."""
    if config is None:
        config = kind()
    elif not isinstance(config, kind):
        raise TypeError(f"config: expected a {kind.__name__}, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(kind)}
    changes = {k: v for k, v in given.items() if v is not None}
    unknown = set(changes) - known
    if unknown:
        raise TypeError(f"{kind.__name__} has no field(s) {sorted(unknown)}")
    return dataclasses.replace(config, **changes) if changes else config


def run_options(run: RunConfig | None, given: dict[str, Any], defaults: dict[str, Any]
                ) -> dict[str, Any]:
    """The run options of one call: a keyword given (not None) wins, then ``run``'s field,
    then the function's own default. ``given`` and ``defaults`` name the same fields."""
    if run is not None and not isinstance(run, RunConfig):
        raise TypeError(f"run: expected a lensattr.RunConfig, got {type(run).__name__}")
    base = (run or RunConfig()).options(**defaults)
    return {k: base[k] if given.get(k) is None else given[k] for k in defaults}
