"""Resolving the audit's inputs: the task and its prompts, the heads, the baselines, the
positions the metric reads and the sink roles. Pure set-up; nothing here runs interventions."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from . import tasks as _tasks
from .claims.head_types import SINK_ROLES
from .metrics import Metric, MetricWarning, as_metric
from .model import Adapter
from .prompts import PromptSet
from .types import AblationMethod

__all__ = [
    "resolve_task",
    "resolve_heads",
    "baselines",
    "read_rows",
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


def read_rows(metric: Metric, prompts: PromptSet) -> torch.Tensor:
    """[batch, pos] bool: the positions the metric reads (its own ``read_positions``), real
    tokens only, on the CPU like the claims. Warns (:class:`MetricWarning`, once per audit) when
    they are every real position of prompts longer than one token and the metric does not
    declare that it reads every position (``reads_every_position``): a plain callable."""
    rows = torch.as_tensor(metric.read_positions(prompts)).bool().cpu() & prompts.valid
    _warn_every_row(metric, rows, prompts.valid.cpu())
    return rows


def _warn_every_row(metric: Metric, rows: torch.Tensor, valid: torch.Tensor) -> None:
    if getattr(metric, "reads_every_position", False) or not bool((valid.sum(1) > 1).any()):
        return
    if bool((rows == valid).all()):
        warnings.warn(
            f"metric {metric.name!r} reads every position, so every real position is a read "
            "row: the claims 'at the read position' average over every query row and the "
            "hook-free engine cannot start from the read row (every intervention runs all "
            "logits on the bridge). If it reads one position, declare it: "
            "lensattr.Metric.from_fn(fn, position=\"END\") (fn then gets the logits there, "
            "[batch, d_vocab]). A Metric that pools every token by design sets "
            "reads_every_position = True.",
            MetricWarning, stacklevel=3)


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
