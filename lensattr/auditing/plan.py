"""Stage 1 of the audit, the plan: the task and its prompts, the heads, the baselines, the claim
sources and whether the prompts can support a verdict (:class:`AuditPlan`). Pure set-up;
nothing here runs interventions."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

from .. import tasks as _tasks
from ..claims.head_types import SINK_ROLES
from ..claims.sources import resolve_claims
from ..compare.judge import min_prompts
from ..compare.verdicts import Thresholds
from ..core.config import RunConfig
from ..core.metric import Metric
from ..core.metrics import as_metric
from ..core.prompts import PromptSet
from ..core.types import AblationMethod
from ..models.adapter import Adapter
from .config import AuditConfig

__all__ = [
    "AuditPlan",
    "make_plan",
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


@dataclass(frozen=True)
class AuditPlan:
    """What the audit will measure: the resolved inputs every later stage reads."""

    adapter: Adapter
    prompts: PromptSet  # with the BOS role recognised
    metric: Metric
    task_name: str
    given_hash: str  # hash of the user's prompts, before the BOS role was added
    heads: list
    claim_sources: tuple[str, ...]
    methods: list[AblationMethod]
    primary: AblationMethod
    thresholds: Thresholds
    min_prompts: int  # prompts needed for any verdict across these heads
    too_few: str | None  # why no verdict is possible, if none is
    seed: int
    max_edge_sources: int
    screen: str
    run: RunConfig


def make_plan(model, task, metric, cfg: AuditConfig) -> AuditPlan:
    """Resolve the inputs; warns (once) when the prompts are too few for any verdict."""
    th = cfg.thresholds
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    prompts, metric, task_name = resolve_task(task, metric, cfg.n_prompts, cfg.seed,
                                              adapter.model)
    given_hash = prompts.hash()  # the user's prompts, before a BOS role is recognised
    prompts = with_bos_role(prompts, adapter)
    n = len(prompts)
    heads = resolve_heads(adapter, cfg.heads)
    chosen = resolve_claims(cfg.claims, adapter.n_layers)
    methods, primary = baselines(prompts, cfg.ablation)
    need = min_prompts(len(heads), th.alpha)
    too_few = None
    if n < need:
        too_few = (f"Too few prompts: with {n} prompt(s) no sign-flip test can reach q < "
                   f"{th.alpha} after correction across {len(heads)} head(s); at least {need} "
                   "prompts are needed for any verdict.")
        warnings.warn(too_few + " Every head will be 'undetermined'.", stacklevel=3)
    return AuditPlan(adapter, prompts, metric, task_name, given_hash, heads, chosen, methods,
                     primary, th, need, too_few, cfg.seed, cfg.max_edge_sources, cfg.screen,
                     cfg.run)
