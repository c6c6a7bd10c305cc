"""What identifies a run's inputs for result keys: the prompts (every field that can change a
number) and the metric (its class, description and state; a wrapped callable by its code,
constants and closure). Used by the engine's and the patching sweeps' checkpoints."""

from __future__ import annotations

import dataclasses
from enum import Enum

from torch import Tensor

from ..core.metric import Metric
from ..core.names import stable_name
from ..core.prompts import PromptSet
from .interventions import digest

__all__ = ["prompts_digest", "metric_identity"]


def prompts_digest(prompts: PromptSet) -> str:
    """Every field of the prompts that can change a number (all but display text and name);
    fields added to PromptSet later are included without further code."""
    skip = {"text", "name"}
    return digest({f.name: getattr(prompts, f.name) for f in dataclasses.fields(prompts)
                   if f.name not in skip})


def metric_identity(metric: Metric) -> dict:
    """The metric's class, description and state; a wrapped callable by its code, constants
    and closure, so two different callables with one name do not share results."""
    return {
        "class": stable_name(type(metric)),
        "describe": _plain(metric.describe()),
        "state": _plain(vars(metric)),
    }


def _plain(v, depth: int = 0):
    """A value :func:`digest` accepts; what it cannot fingerprint becomes its repr (which,
    when it holds a memory address, only ever prevents reuse)."""
    if depth > 6:
        return repr(v)
    if v is None or isinstance(v, (bool, int, float, str, bytes, Enum, Tensor)):
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x, depth + 1) for x in v]
    code = getattr(v, "__code__", None)
    if callable(v) and code is not None:
        cells = [c.cell_contents for c in (getattr(v, "__closure__", None) or ())]
        return {
            "callable": f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', '')}",
            "code": _code(code),
            "defaults": _plain(getattr(v, "__defaults__", None), depth + 1),
            "closure": _plain(cells, depth + 1),
        }
    return repr(v)


def _code(code) -> list:
    consts = [_code(c) if hasattr(c, "co_code") else _plain(c) for c in code.co_consts]
    return [code.co_code, consts, list(code.co_names)]
