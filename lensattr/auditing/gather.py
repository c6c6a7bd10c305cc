"""Stage 2 of the audit, the evidence: every intervention the verdicts read, run on the engine
and keyed by :class:`~lensattr.evidence.keys.EvidenceKey` (:class:`Gathered`).

Solo ablations under every baseline (tracked, for partner candidates), the effect scale, the
screening, the claimed-set, sink, direct-path, single-edge and pattern edits, the locus of
effects that live off the read rows, and the joint ablations of compensation partners."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..claims import Claims, compute_claims
from ..compare.compensation import candidate_partners
from ..compare.judge import Effects
from ..compare.locus import LocusEdges, locus_edges, needs_locus
from ..compare.screening import Screen, screen_heads
from ..compare.verdicts import Thresholds
from ..core.distributed import world
from ..core.metrics import read_rows
from ..core.types import AblationMethod, HeadId
from ..evidence import Engine, ablate
from ..evidence.keys import EvidenceKey, Kind, key
from ..evidence.sweeps import (
    ablation_sweep,
    claim_sweep,
    direct_sweep,
    edge_sweep,
    joint_sweep,
    pattern_sweep,
    row_split_sweep,
    sink_sweep,
)
from ..stats.inference import Estimate
from .columns import source_positions
from .plan import AuditPlan, patterns_from_cache

__all__ = ["Gathered", "make_engine", "gather"]


@dataclass
class Gathered:
    """The evidence of one audit: the engine's clean runs, the claims, every effect by key,
    the screening, the examined sources and the locus edges."""

    engine: Engine
    claims: Claims
    eff: Effects
    screening: Screen
    reference: str  # what the effects are normalised by, in words
    direct: bool  # whether direct paths were measured
    sources: list[torch.Tensor]  # per examined source: [batch] positions (-1 absent)
    source_names: list[str]
    locus: dict[HeadId, LocusEdges]


def make_engine(plan: AuditPlan) -> Engine:
    # one progress bar for the whole audit is the audit's own (see gather)
    return Engine(plan.adapter, plan.prompts, plan.metric, progress=False, run=plan.run)


def gather(plan: AuditPlan, engine: Engine, cache=None) -> Gathered:
    """Run the evidence; one progress bar over the whole audit when ``plan.run.progress``."""
    adapter, prompts = plan.adapter, plan.prompts
    patterns = engine.patterns if cache is None else patterns_from_cache(adapter, cache, prompts)
    rows = read_rows(plan.metric, prompts)
    claims = compute_claims(patterns, prompts, rows, causal=adapter.is_causal)
    direct = engine.final_scale is not None and adapter.has_direct_path
    progress = plan.run.progress if plan.run.progress is not None else True
    bar = tqdm(desc="lensattr audit", unit="iv", disable=not progress or not world().lead,
               total=0)
    engine.bar = bar
    try:
        values, head_delta = _solo(engine, plan)
        if prompts.corrupted is None:
            everything = ablate(*adapter.heads(), method=AblationMethod.ZERO)
            ref = dataclasses.replace(everything, label=str(_REF), key=_REF)
            values.update(_values(engine, [ref]))
            assert engine.clean is not None
            den = values[_REF] - engine.clean
            reference = "all heads zero-ablated (no corrupted prompts)"
        else:
            assert engine.corrupted is not None and engine.clean is not None
            den, reference = engine.corrupted - engine.clean, "corrupted prompts (m_c - m0)"
        eff = Effects(values, engine.clean, den, plan.seed)
        screening = screen_heads(plan.heads, eff, plan.methods, plan.primary, plan.thresholds,
                                 plan.screen)
        sources, names = source_positions(prompts, claims, claims.read_pos,
                                          plan.max_edge_sources)
        values.update(_values(engine, _edits(plan, claims, screening, sources, direct)))
        locus = _locus(plan, engine, eff, screening, claims)
        _partners(plan, engine, eff, head_delta, values)
    finally:
        bar.close()
    return Gathered(engine, claims, eff, screening, reference, direct, sources, names, locus)


_REF = EvidenceKey(Kind.REFERENCE)


def _solo(engine: Engine, plan: AuditPlan) -> tuple[dict, dict]:
    """Solo ablations under every baseline, tracked (each head's output change)."""
    values, head_delta = {}, {}
    for m in plan.methods:
        ivs = ablation_sweep(plan.heads, m)
        res = _run(engine, ivs, track=True)
        values.update(_keyed(ivs, res))
        head_delta[m.value] = res.head_delta
    return values, head_delta


def _edits(plan: AuditPlan, claims: Claims, screening: Screen, sources, direct: bool
           ) -> list:
    """Row split, claimed-set, sink, direct-path, single-edge and pattern edits."""
    primary, prompts = plan.primary, plan.prompts
    located = screening.located[primary.value]
    edits = row_split_sweep(located, primary, claims.read_rows)
    for m in plan.methods:  # keep-only C, remove C (necessity) and the sink share, per baseline
        edits += claim_sweep(screening.located[m.value], claims.claimed, claims.allowed,
                             claims.sink, m, remove=True, read_rows=claims.read_rows)
        if claims.sink.any():
            edits += sink_sweep(screening.located[m.value], claims.allowed, claims.sink, m)
        if direct:
            edits += direct_sweep(plan.heads, m)
    edits += edge_sweep(located, claims.read_rows, sources, prompts.n_pos, primary)
    if primary != AblationMethod.ZERO:  # pattern patching: the weights alone, values kept
        edits += edge_sweep(located, claims.read_rows, sources, prompts.n_pos, primary,
                            kind=Kind.PATTERN, weights_only=True)
        edits += pattern_sweep(located, claims.allowed, claims.read_rows, primary)
    return edits


def _locus(plan: AuditPlan, engine: Engine, eff: Effects, screening: Screen,
           claims: Claims) -> dict[HeadId, LocusEdges]:
    """Edges at the row where an effect lives, for heads whose effect is not at the read rows."""
    b, th = plan.primary, plan.thresholds
    located = screening.located[b.value]
    focus = [h for h in located if plan.too_few is None and needs_locus(
        eff(key(Kind.ABLATE, h, baseline=b)), eff(key(Kind.READ, h, baseline=b)),
        eff(key(Kind.OTHER, h, baseline=b)), th)]
    return locus_edges(lambda ivs: _values(engine, ivs), eff, focus, b, claims, plan.prompts,
                       plan.max_edge_sources)


def _partners(plan: AuditPlan, engine: Engine, eff: Effects, head_delta: dict, values: dict
              ) -> None:
    """Joint ablations of each possibly-small head with its partner candidates, per baseline."""
    out_clean = torch.stack(list(engine.out_clean), 1)  # [batch, layer, head, d_model]
    for m in plan.methods:
        cands = candidate_partners(head_delta[m.value], out_clean, plan.heads)
        # partners only decide verdicts: none to search when the prompts cannot support one
        weak = [h for h in plan.heads if plan.too_few is None
                and _maybe_small(eff(key(Kind.ABLATE, h, baseline=m)), plan.thresholds)]
        pairs = sorted({tuple(sorted((h, c))) for h in weak for c in cands[h]})
        values.update(_values(engine, joint_sweep(pairs, m)))


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


def _keyed(interventions: list, res) -> dict[EvidenceKey, torch.Tensor]:
    """Values by evidence key; every intervention of the audit is named by one."""
    out = {}
    for iv, v in zip(interventions, res.values, strict=True):
        if iv.key is None:
            raise ValueError(f"intervention {iv.label!r} has no evidence key")
        out[iv.key] = v
    return out


def _values(engine: Engine, interventions: list) -> dict[EvidenceKey, torch.Tensor]:
    return _keyed(interventions, _run(engine, interventions))
