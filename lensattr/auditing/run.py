"""``audit(model, task)``: claims vs evidence for every head, with verdicts and statistics."""

from __future__ import annotations

import dataclasses
import json
import time
import warnings

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..claims import compute_claims
from ..claims.head_types import SINK_ROLES
from ..claims.sources import resolve_claims
from ..compare.compensation import candidate_partners
from ..compare.judge import Effects, carriers, judge, min_prompts
from ..compare.locus import locus_edges, needs_locus
from ..compare.screening import screen_heads
from ..compare.verdicts import Thresholds
from ..core.metrics import read_rows
from ..core.types import AblationMethod
from ..evidence import Engine, ablate
from ..evidence.sweeps import (
    ablation_sweep,
    claim_sweep,
    direct_sweep,
    edge_sweep,
    joint_sweep,
    label,
    pattern_sweep,
    row_split_sweep,
    sink_sweep,
)
from ..models.adapter import Adapter
from ..stats.agreement import EFFECT_NOISE, noise_floor
from ..stats.inference import Estimate
from .atp import atp_columns
from .columns import (
    HeadResult,
    edge_rows,
    head_row,
    position_name,
    rank_baseline_flags,
    source_positions,
)
from .integration import claim_columns
from .meta import audit_meta
from .plan import baselines, patterns_from_cache, resolve_heads, resolve_task, with_bos_role
from .result import Audit

__all__ = ["audit", "Audit"]


def audit(
    model,
    task,
    metric=None,
    *,
    cache=None,
    ablation: str | None = None,
    n_prompts: int | None = None,
    seed: int = 0,
    thresholds: Thresholds | None = None,
    n_boot: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
    checkpoint: str | None = None,
    max_edge_sources: int = 24,
    heads=None,
    fast: bool = True,
    memory_budget: int | None = None,
    screen: str = "auto",
    claims=None,
) -> Audit:
    """Audit every head of ``model`` on ``task``.

    Args:
        model: a ``TransformerBridge`` (e.g. from :func:`lensattr.load_model`).
        task: a task name, a :class:`~lensattr.tasks.Task`, or a :class:`PromptSet`.
        metric: a :class:`~lensattr.metrics.Metric` or a plain callable on logits; defaults
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
        progress: one progress bar over the whole audit, with an ETA.
        fast: run interventions on the hook-free forward where it reproduces the bridge
            (causal decoders; see :mod:`lensattr.evidence.bare`); ``False`` runs every one as a
            full bridge forward (the reference). ``meta["engine"]`` says which path ran.
        memory_budget: bytes of working memory per forward chunk (default: unbounded;
            ``batch_size`` still caps rows). A chunk holds at least one intervention (one row
            per prompt); a budget too small for one row is refused.
        screen: ``"auto"``: a head whose exact effect under a baseline does not clear the
            null margin gets no routing edits, row split or single edges under it (no verdict
            reads them; see :mod:`lensattr.screening`); ``"none"``: every head gets all.
        claims: claim sources compared with the evidence, some of ``["raw", "norm",
            "rollout", "flow"]`` (or a comma string); ``raw`` is always included. Default:
            raw, norm, rollout, and flow on models of at most 12 layers when python-igraph
            is installed (see :mod:`lensattr.claim_sources`). Each gives edge columns
            (``attention``, ``norm_attention``, ``rollout``, ``flow``; rollout/flow are the
            layer-level value up to and including the edge's layer), head columns
            (``agree_<source>``, ``<source>_top_source``) and rows of ``Audit.agreement``;
            rollout/flow also feed the token table (``Audit.tokens``).
    """
    t0 = time.time()
    th = thresholds or Thresholds()
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    prompts, metric, task_name = resolve_task(task, metric, n_prompts, seed, adapter.model)
    given_hash = prompts.hash()  # the user's prompts, before a BOS role is recognised
    prompts = with_bos_role(prompts, adapter)
    n = len(prompts)
    heads = resolve_heads(adapter, heads)
    chosen = resolve_claims(claims, adapter.n_layers)
    methods, primary = baselines(prompts, ablation)
    need = min_prompts(len(heads), th.alpha)
    too_few = None
    if n < need:
        too_few = (f"Too few prompts: with {n} prompt(s) no sign-flip test can reach q < "
                   f"{th.alpha} after correction across {len(heads)} head(s); at least {need} "
                   "prompts are needed for any verdict.")
        warnings.warn(too_few + " Every head will be 'undetermined'.", stacklevel=2)
    engine = Engine(adapter, prompts, metric, batch_size=batch_size, progress=False,
                    checkpoint=checkpoint, fast=fast, memory_budget=memory_budget)
    patterns = engine.patterns if cache is None else patterns_from_cache(adapter, cache, prompts)
    rows = read_rows(metric, prompts)
    claims = compute_claims(patterns, prompts, rows, causal=adapter.is_causal)
    direct = engine.final_scale is not None and adapter.has_direct_path
    bar = tqdm(desc="lensattr audit", unit="iv", disable=not progress, total=0)
    engine.bar = bar

    try:
        # ---- evidence: solo ablations (tracked, for partner candidates) and edits -------------
        values, head_delta = {}, {}
        for m in methods:
            res = _run(engine, ablation_sweep(heads, m), track=True)
            values.update(_values(res))
            head_delta[m.value] = res.head_delta
        if prompts.corrupted is None:
            everything = ablate(*adapter.heads(), method=AblationMethod.ZERO)
            ref = dataclasses.replace(everything, label="reference:all-zero")
            values.update(_values(_run(engine, [ref])))
            den = values["reference:all-zero"] - engine.clean
            reference = "all heads zero-ablated (no corrupted prompts)"
        else:
            den, reference = engine.corrupted - engine.clean, "corrupted prompts (m_c - m0)"
        eff = Effects(values, engine.clean, den, seed)
        screening = screen_heads(heads, eff, methods, primary, th, screen)
        located = screening.located[primary.value]
        plan = row_split_sweep(located, primary, claims.read_rows)
        for m in methods:  # keep-only C, remove C (necessity) and the sink share, per baseline
            plan += claim_sweep(screening.located[m.value], claims.claimed, claims.allowed,
                                claims.sink, m, remove=True, read_rows=claims.read_rows)
            if claims.sink.any():
                plan += sink_sweep(screening.located[m.value], claims.allowed, claims.sink, m)
            if direct:
                plan += direct_sweep(heads, m)
        sources, source_names = source_positions(prompts, claims, claims.read_pos, max_edge_sources)
        plan += edge_sweep(located, claims.read_rows, sources, prompts.n_pos, primary)
        if primary != AblationMethod.ZERO:  # pattern patching: the weights alone, values kept
            plan += edge_sweep(located, claims.read_rows, sources, prompts.n_pos, primary,
                               kind="pattern", weights_only=True)
            plan += pattern_sweep(located, claims.allowed, claims.read_rows, primary)
        values.update(_values(_run(engine, plan)))
        b = primary.value
        focus = [h for h in located if too_few is None and needs_locus(
            eff(label(b, h)), eff(label(f"read-{b}", h)), eff(label(f"other-{b}", h)), th)]
        locus = locus_edges(lambda ivs: _values(_run(engine, ivs)), eff, focus, primary, claims,
                            prompts, max_edge_sources)

        # ---- compensation partners, under every baseline --------------------------------------
        out_clean = torch.stack(list(engine.out_clean), 1)  # [batch, layer, head, d_model]
        for m in methods:
            cands = candidate_partners(head_delta[m.value], out_clean, heads)
            # partners only decide verdicts: none to search when the prompts cannot support one
            weak = [h for h in heads
                    if too_few is None and _maybe_small(eff(label(m.value, h)), th)]
            pairs = sorted({tuple(sorted((h, c))) for h in weak for c in cands[h]})
            values.update(_values(_run(engine, joint_sweep(pairs, m))))
    finally:
        bar.close()

    # ---- verdicts under every baseline; the label follows the primary ----------------------
    jd = judge(eff, heads, methods, claims.striking, direct, th, too_few)
    p = jd.p[primary.value]
    results = []
    for i, h in enumerate(heads):
        ev, verdict = jd.evidence[primary.value][i], jd.verdicts[primary.value][i]
        edge_est = [eff.get(label(f"edge-{primary.value}", h, extra=f"@{j}"))
                    for j in range(len(sources))]
        pattern_est = [eff.get(label(f"pattern-{primary.value}", h, extra=f"@{j}"))
                       for j in range(len(sources))]
        knock = {k: eff.get(label(f"{k}-{primary.value}", h)) for k in ("remove", "keep", "sink")}
        results.append(HeadResult(
            head=h,
            effects={m.value: eff(label(m.value, h)) for m in methods},
            split={k: eff.get(label(f"{k}-{primary.value}", h)) for k in ("read", "other")},
            knockouts={**knock, "renorm": eff.get(label("renorm", h))},
            routing=ev.routing,
            routing_by={m.value: jd.evidence[m.value][i].routing for m in methods},
            direct=eff.get(label(f"direct-{primary.value}", h)),
            evidence=ev, verdict=verdict,
            by_baseline={m.value: jd.verdicts[m.value][i] for m in methods},
            p=float(p[i]),
            carriers=_carriers(h, locus, edge_est, source_names, ev.effect, th, prompts)
            if too_few is None else "",
            edges=edge_est,
            pattern_edges=pattern_est,
            pattern_read=eff.get(label(f"pattern-read-{primary.value}", h)),
            locus=locus.get(h),
        ))  # fmt: skip

    floor = noise_floor(engine.clean, eff.den)  # effects below it are float32 rounding
    cc = claim_columns(adapter, engine, prompts, metric, claims, results, chosen, sources,
                       source_names, seed, batch_size, floor)
    atp_cols, atp_edges, atp_meta = atp_columns(adapter, prompts, metric, heads, eff, methods,
                                                batch_size, claims.read_rows, sources,
                                                [r.pattern_edges for r in results], floor)
    heads_df = pd.DataFrame([{**head_row(r, claims, prompts, cc.norm), **cc.head_rows[r.head],
                              **atp_cols[r.head]} for r in results])
    heads_df = rank_baseline_flags(
        heads_df.astype({"partner_layer": "Int64", "partner_head": "Int64"}))
    edges_df = edge_rows(results, claims, prompts, sources, source_names, cc.norm, cc.layered,
                         atp_edges)
    tensors = _tensors(results, claims, prompts, engine, methods, adapter)
    meta = audit_meta(
        adapter,
        prompts,
        metric,
        task_name,
        primary,
        methods,
        reference,
        th,
        seed,
        time.time() - t0,
    )
    meta["prompts_hash"] = given_hash
    meta["sink_roles"] = [r for r in SINK_ROLES if r in prompts.roles]
    meta["heads_audited"] = [list(h) for h in heads]
    meta["agreement"] = json.loads(cc.agreement.to_json(orient="records"))
    meta.update(cc.meta)
    meta["min_prompts_for_a_verdict"] = need
    meta["effect_noise_floor"] = floor
    meta["effect_noise_floor_definition"] = (
        f"{EFFECT_NOISE} x (max |m0| + 1) / |mean(m_ref - m0)|: normalised effects below it are "
        "float32 rounding (two exact engines differ by up to that much) and rank as 0 in the "
        "agreement statistics (agree_*, Audit.agreement, meta['atp'])")
    meta["weight_processing"] = adapter.weight_processing()
    meta["screening"] = screening.record
    meta["atp"] = atp_meta
    meta["engine"] = {
        "path": "hook-free" if engine.fast else "bridge",
        "why_not_hook_free": engine.fast_reason,
        "rows": dict(engine.n_rows),
        "forward_work": round(engine.work, 2),
        "forward_work_unit": "one clean forward pass of one prompt (layers x positions run "
        "by the edits: from the first edited layer and query position on)",
        "threads": torch.get_num_threads(),
    }
    tok = getattr(adapter.model, "tokenizer", None)
    if tok is not None:  # the example prompt as text, for the report
        meta["example_text_tokens"] = [tok.decode([i]) for i in prompts.tokens[0].tolist()]
    return Audit(heads=heads_df, edges=edges_df, tensors=tensors, meta=meta, tokens=cc.tokens)


def _carriers(h, locus, edge_est, names, e_h, th, prompts) -> str:
    """Carriers at the read rows; for a head whose effect lives at another row, at that row."""
    if h in locus:
        loc = locus[h]
        return carriers(loc.edges, [position_name(prompts, k) for k in loc.sources], e_h, th)
    return carriers(edge_est, names, e_h, th)


def _maybe_small(e: Estimate, th: Thresholds) -> bool:
    """Could the solo effect be small (the compensation rule's premise)? Partners are only
    searched for such heads; NaN CIs (too few prompts) count as maybe."""
    return not (e.lo >= th.tau or e.hi <= -th.tau)


def _run(engine: Engine, interventions: list, track: bool = False):
    bar = engine.bar
    if bar is not None:
        bar.total += len(interventions)
        bar.refresh()
    return engine.run(interventions, track_heads=track)


def _values(res) -> dict:
    return dict(zip(res.labels, res.values, strict=True))


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
