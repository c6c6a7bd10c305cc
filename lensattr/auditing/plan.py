"""Resolving the audit's inputs: the task and its prompts, the heads, the baselines, the
positions the metric reads and the sink roles. Pure set-up; nothing here runs interventions."""

from __future__ import annotations

import dataclasses

import torch

from .. import tasks as _tasks
from ..claims.head_types import SINK_ROLES
from ..core.metrics import as_metric
from ..core.prompts import PromptSet
from ..core.types import AblationMethod
from ..models.adapter import Adapter

__all__ = [
    "resolve_task",
    "resolve_heads",
    "baselines",
    "with_bos_role",
    "patterns_from_cache",
]


def baselines(prompts: PromptSet, ablation) -> tuple[list[AblationMethod], AblationMethod]:
    """Baselines computed: zero always, mean on aligned prompts (a per-position mean over
    prompts means nothing otherwise), resample with corrupted prompts. Primary: resample, else
    mean, else zero, unless ``ablation`` says otherwise."""
    methods = [AblationMethod.ZERO]
    if prompts.aligned:
        methods.append(AblationMethod.MEAN)
    if prompts.corrupted is not None:
        methods.append(AblationMethod.RESAMPLE)
    if ablation is None:
        return methods, methods[-1]
    try:
        primary = AblationMethod(ablation)
    except ValueError:
        raise ValueError(
            f"ablation: expected one of {[m.value for m in AblationMethod]}, got {ablation!r}"
        ) from None
    if primary not in methods:
        why = ("needs corrupted prompts in the task" if primary == AblationMethod.RESAMPLE
               else "needs aligned prompts (one length, no padding, roles at fixed positions)")
        raise ValueError(f"ablation: {primary.value!r} {why}")
    return methods, primary


def with_bos_role(prompts: PromptSet, adapter: Adapter) -> PromptSet:
    """Add a BOS role when the prompts declare no sink role and every prompt's first real token
    is the tokenizer's BOS token; never names a content token "BOS"."""
    if any(r in prompts.roles for r in SINK_ROLES):
        return prompts
    tok = getattr(adapter.model, "tokenizer", None)
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return prompts
    first = prompts.valid.long().argmax(1)
    if not bool((prompts.tokens[torch.arange(len(prompts)), first] == bos).all()):
        return prompts
    return dataclasses.replace(prompts, roles={**prompts.roles, "BOS": first})


def resolve_heads(adapter: Adapter, heads) -> list:
    if heads is None:
        return adapter.heads()
    if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
        raise ValueError(
            f"heads: expected a list of HeadId(layer, head), got {type(heads).__name__}"
        )
    chosen = [adapter.check_head(h, "heads") for h in heads]
    if not chosen:
        raise ValueError("heads: expected at least one head, got an empty list")
    if len(set(chosen)) != len(chosen):
        raise ValueError("heads: the same head is listed twice")
    return sorted(chosen)


def resolve_task(task, metric, n_prompts, seed, model) -> tuple[PromptSet, object, str]:
    if isinstance(task, str):
        task = _tasks.get(task)
    if isinstance(task, _tasks.Task):
        prompts = task.prompts(n_prompts, seed, model)
        return prompts, as_metric(metric or task.metric()), task.name
    if isinstance(task, PromptSet):
        if metric is None:
            raise ValueError("metric: required when auditing a bare PromptSet")
        return task.first(n_prompts), as_metric(metric), task.name  # n_prompts: the first n
    raise TypeError(f"task: expected a task name, Task or PromptSet, got {type(task).__name__}")


def patterns_from_cache(adapter: Adapter, cache, prompts: PromptSet) -> list[torch.Tensor]:
    pats = adapter.patterns_from_cache(cache)
    want = (len(prompts), adapter.n_heads, prompts.n_pos, prompts.n_pos)
    if tuple(pats[0].shape) != want:
        raise ValueError(
            f"cache: patterns of shape {tuple(pats[0].shape)}, expected {want} for these prompts"
        )
    return pats
