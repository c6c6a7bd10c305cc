"""``audit(model, task)``: claims vs evidence for every head, with verdicts and statistics.

The audit is a pipeline of four stages with typed hand-offs:
plan (:func:`~lensattr.auditing.plan.make_plan` -> ``AuditPlan``) -> evidence
(:func:`~lensattr.auditing.gather.gather` -> ``Gathered``, keyed by ``EvidenceKey``) ->
judgement (:func:`~lensattr.auditing.judgement.head_results` -> ``HeadResult`` records) ->
tables (:func:`tables` -> :class:`Audit`, whose tables are views of the records).
"""

from __future__ import annotations

import time

import pandas as pd
import torch

from ..compare.verdicts import Thresholds
from ..core.config import RunConfig, merge
from ..stats.agreement import noise_floor
from .atp import atp_columns
from .columns import HeadResult, edge_rows, head_row, rank_baseline_flags
from .config import AuditConfig
from .gather import Gathered, gather, make_engine
from .integration import claim_columns
from .judgement import head_results
from .meta import run_meta
from .plan import AuditPlan, make_plan
from .result import Audit
from .show import keep_patterns

__all__ = ["audit", "Audit", "AuditConfig", "tables"]


def audit(
    model,
    task,
    metric=None,
    *,
    cache=None,
    ablation: str | None = None,
    n_prompts: int | None = None,
    seed: int | None = None,
    thresholds: Thresholds | None = None,
    n_boot: int | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    checkpoint: str | None = None,
    max_edge_sources: int | None = None,
    heads=None,
    fast: bool | None = None,
    memory_budget: int | None = None,
    screen: str | None = None,
    claims=None,
    config: AuditConfig | None = None,
) -> Audit:
    """Audit every head of ``model`` on ``task``.

    Args:
        model: a ``TransformerBridge`` (e.g. from :func:`lensattr.load_model`).
        task: a task name, a :class:`~lensattr.tasks.Task`, or a :class:`PromptSet`.
        metric: a :class:`~lensattr.core.metric.Metric` or a plain callable on logits; defaults
            to the task's metric (required with a bare PromptSet).
        cache: an optional clean ``ActivationCache`` of the same prompts; its attention patterns
            are used for the claims.
        ablation: the primary baseline (``zero``/``mean``/``resample``) whose label is shown;
            default resample when the prompts have corrupted versions, else mean on aligned
            prompts, else zero. Every baseline computed is judged; see ``labels_by_baseline``.
        n_prompts: how many prompts a task makes (default: the task's own number); with a
            PromptSet, its first ``n_prompts`` prompts (more than it holds is refused).
        checkpoint: a file path; evidence is saved there after every chunk and an interrupted
            audit resumes from it.
        heads: audit only these heads (``HeadId`` or ``(layer, head)`` pairs); default every
            head. Multiple-testing correction and partner search run over the chosen heads;
            per-head tensors hold NaN for the others.
        n_boot: ignored (intervals are Fieller's, which need no resampling); kept so older
            calls keep working.
        config: an :class:`~lensattr.auditing.config.AuditConfig` holding these options
            (``run=RunConfig(...)`` for batch_size, progress, checkpoint, fast,
            memory_budget); keyword arguments that are not None override its fields.
        progress: one progress bar over the whole audit, with an ETA.
        fast: run interventions on the hook-free forward where it reproduces the bridge
            (causal decoders; see :mod:`lensattr.evidence.bare`); ``False`` runs every one as a
            full bridge forward (the reference). ``meta["engine"]`` says which path ran.
        memory_budget: bytes of working memory per forward chunk (default: unbounded;
            ``batch_size`` still caps rows). A chunk holds at least one intervention (one row
            per prompt); a budget too small for one row is refused.
        screen: ``"auto"``: a head whose exact effect under a baseline does not clear the
            null margin gets no routing edits, row split or single edges under it (no verdict
            reads them; see :mod:`lensattr.compare.screening`); ``"none"``: every head gets all.
        claims: claim sources compared with the evidence, some of ``["raw", "norm",
            "rollout", "flow"]`` (or a comma string); ``raw`` is always included. Default:
            raw, norm, rollout, and flow on models of at most 12 layers when python-igraph
            is installed (see :mod:`lensattr.claims.sources`). Each gives edge columns
            (``attention``, ``norm_attention``, ``rollout``, ``flow``; rollout/flow are the
            layer-level value up to and including the edge's layer), head columns
            (``agree_<source>``, ``<source>_top_source``) and rows of ``Audit.agreement``;
            rollout/flow also feed the token table (``Audit.tokens``).

    Under an initialised ``torch.distributed`` process group (``torchrun``), the ranks share
    the interventions and occlusion forwards (:mod:`lensattr.core.distributed`) and every rank
    returns the whole, bit-identical Audit: save it on rank 0. With ``checkpoint``, rank r > 0
    saves to ``<stem>.rank<r><suffix>`` beside it; any number of ranks resumes from them all.
    A rank that stops is a :class:`~lensattr.core.distributed.RankFailure` naming it.
    """
    del n_boot
    t0 = time.time()
    cfg = merge(config, AuditConfig, dict(
        ablation=ablation, n_prompts=n_prompts, seed=seed, thresholds=thresholds,
        max_edge_sources=max_edge_sources, heads=heads, screen=screen, claims=claims))
    cfg = merge(cfg, AuditConfig, {"run": merge(cfg.run, RunConfig, dict(
        batch_size=batch_size, progress=progress, checkpoint=checkpoint, fast=fast,
        memory_budget=memory_budget))})
    plan = make_plan(model, task, metric, cfg)
    evidence = gather(plan, make_engine(plan), cache)
    return tables(plan, evidence, head_results(plan, evidence), t0)


def tables(plan: AuditPlan, g: Gathered, results: list[HeadResult], t0: float) -> Audit:
    """Stage 4: the claim columns, AtP beside the exact effects, and the tables, tensors and
    meta of the :class:`Audit`, which also keeps every head's verdict records."""
    adapter, prompts, claims, engine = plan.adapter, plan.prompts, g.claims, g.engine
    batch_size = plan.run.options(batch_size=64)["batch_size"]
    floor = noise_floor(engine.clean, g.eff.den, adapter.dtype)  # below it: rounding
    cc = claim_columns(adapter, engine, prompts, plan.metric, claims, results,
                       plan.claim_sources, g.sources, g.source_names, plan.seed, batch_size,
                       floor)
    atp_cols, atp_edges, atp_meta = atp_columns(
        adapter, prompts, plan.metric, plan.heads, g.eff, plan.methods, batch_size,
        claims.read_rows, g.sources, [r.pattern_edges for r in results], floor)
    heads_df = pd.DataFrame([{**head_row(r, claims, prompts, cc.norm), **cc.head_rows[r.head],
                              **atp_cols[r.head]} for r in results])
    heads_df = rank_baseline_flags(
        heads_df.astype({"partner_layer": "Int64", "partner_head": "Int64"}))
    edges_df = edge_rows(results, claims, prompts, g.sources, g.source_names, cc.norm,
                         cc.layered, atp_edges)
    tensors = _tensors(results, claims, prompts, engine, plan.methods, adapter)
    meta = run_meta(plan, g, cc, atp_meta, floor, time.time() - t0)
    records = {r.head: dict(r.by_baseline) for r in results}  # baseline -> Verdict
    kept = keep_patterns(claims.patterns, prompts, claims.read_pos,  # in memory, for show()
                         getattr(adapter.model, "tokenizer", None))
    return Audit(heads=heads_df, edges=edges_df, tensors=tensors, meta=meta, tokens=cc.tokens,
                 records=records, prompt_patterns=kept)


def _tensors(results, claims, prompts, engine, methods, adapter) -> dict:
    L, H, n = adapter.n_layers, adapter.n_heads, len(prompts)

    def grid(get):
        out = torch.full((L, H, n), float("nan"))
        for r in results:
            out[r.head.layer, r.head.head] = get(r).per_prompt
        return out

    tensors = {
        "clean_metric": engine.clean,
        "pattern_example": claims.patterns[0],
        "example_tokens": prompts.tokens[0],
        "routing_per_prompt": grid(lambda r: r.routing),
    }
    if prompts.corrupted is not None:
        tensors["corrupted_metric"] = engine.corrupted
    for m in methods:
        tensors[f"effect_{m.value}_per_prompt"] = grid(lambda r, _m=m.value: r.effects[_m])
    if prompts.aligned:
        tensors["pattern_mean"] = claims.patterns.mean(0)
    return tensors
