"""``audit(model, task)``: claims vs evidence for every head, with verdicts and statistics."""

from __future__ import annotations

import math
import time

import torch

from . import tasks as _tasks
from .audit_result import Audit
from .claims import compute_claims
from .compare.compensation import candidate_partners
from .compare.stats import Estimate, bh_qvalues, ratio_of_means, signflip_p
from .compare.verdicts import Compensation, Thresholds, decide, prompt_holds
from .evidence import Engine
from .evidence.sweeps import ablation_sweep, claim_sweep, edge_sweep, joint_sweep, label
from .metrics import as_metric
from .model import Adapter
from .prompts import PromptSet
from .tables import edge_rows, head_row, source_positions
from .types import AblationMethod

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
    n_boot: int = 1000,
    batch_size: int = 256,
    progress: bool = True,
    checkpoint: str | None = None,
    max_edge_sources: int = 24,
) -> Audit:
    """Audit every head of ``model`` on ``task``.

    Args:
        model: a ``TransformerBridge`` (e.g. from :func:`lensattr.load_model`).
        task: a task name, a :class:`~lensattr.tasks.Task`, or a :class:`PromptSet`.
        metric: a :class:`~lensattr.metrics.Metric` or a plain callable on logits; defaults
            to the task's metric (required with a bare PromptSet).
        cache: an optional clean ``ActivationCache`` of the same prompts; its attention patterns
            are used for the claims.
        ablation: primary ablation for relevance (``zero``/``mean``/``resample``); default
            resample when the prompts have corrupted versions, else mean.
        checkpoint: a file path; evidence is saved there after every chunk and an interrupted
            audit resumes from it.
    """
    t0 = time.time()
    th = thresholds or Thresholds()
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    prompts, metric, task_name = _resolve_task(task, metric, n_prompts, seed)
    n = len(prompts)
    engine = Engine(
        adapter, prompts, metric, batch_size=batch_size, progress=progress, checkpoint=checkpoint
    )
    patterns = engine.patterns if cache is None else _patterns_from_cache(adapter, cache, prompts)
    read_pos = engine._read_pos(engine.readout)
    claims = compute_claims(patterns, prompts, read_pos, causal=adapter.is_causal)
    heads = adapter.heads()
    methods = [AblationMethod.ZERO, AblationMethod.MEAN]
    if prompts.corrupted is not None:
        methods.append(AblationMethod.RESAMPLE)
    primary = AblationMethod(ablation) if ablation else methods[-1]
    if primary not in methods:
        raise ValueError(f"ablation: {primary.value!r} needs corrupted prompts in the task")

    # ---- evidence ------------------------------------------------------------------------
    m0 = engine.clean
    res = engine.run(ablation_sweep(heads, primary), track_heads=True, desc="ablate heads")
    values = dict(zip(res.labels, res.values, strict=True))
    other = [iv for m in methods if m != primary for iv in ablation_sweep(heads, m)]
    direct = engine.final_scale is not None and adapter.has_direct_path
    other += claim_sweep(heads, claims.claimed, claims.allowed, direct)
    if prompts.corrupted is None:
        from .evidence.interventions import ablate

        other.append(ablate(*heads, method=AblationMethod.ZERO, label="reference:all-zero"))
    sources, source_names = source_positions(prompts, claims, read_pos, max_edge_sources)
    other += edge_sweep(heads, read_pos, sources, prompts.n_pos)
    res2 = engine.run(other, desc="claims and edges")
    values.update(zip(res2.labels, res2.values, strict=True))
    if prompts.corrupted is not None:
        den, reference = engine.corrupted - m0, "corrupted prompts (m_c - m0)"
    else:
        den, reference = values["reference:all-zero"] - m0, "all heads zero-ablated (no corrupted)"

    def effect(lbl: str) -> Estimate:
        return ratio_of_means(values[lbl] - m0, den, n_boot=n_boot, seed=seed, label=lbl)

    prim = [effect(label(primary.value, h)) for h in heads]
    p = signflip_p(torch.stack([values[label(primary.value, h)] - m0 for h in heads]), seed=seed)
    q = bh_qvalues(p)

    # ---- compensation partners ---------------------------------------------------------
    clean_norm = torch.stack([o.norm(dim=-1).mean(0) for o in engine.out_clean])  # [L, H]
    cands = candidate_partners(res.head_delta, clean_norm, heads)
    weak = {
        h for h, e in zip(heads, prim, strict=True) if not math.isnan(e.value) and e.hi < th.tau
    }
    pairs = sorted({tuple(sorted((h, c))) for h in weak for c in cands[h]})
    jres = engine.run(joint_sweep(pairs, primary), desc="partner pairs") if pairs else None
    if jres is not None:
        values.update(zip(jres.labels, jres.values, strict=True))

    # ---- verdicts ------------------------------------------------------------------------
    thr = th.to_dict()
    head_rows, per_prompt = [], {}
    for i, h in enumerate(heads):
        est = {m.value: effect(label(m.value, h)) for m in methods}
        zero = values[label("zero", h)]
        rho = ratio_of_means(
            values[label("keep", h)] - zero,
            m0 - zero,
            n_boot=n_boot,
            seed=seed,
            label=label("rho", h),
        )
        comp, partner_e = _compensation(
            h, cands[h], values, m0, den, direct, primary, n_boot, seed, th, prim[i]
        )
        striking = bool(claims.claim_score[h.layer, h.head] >= th.striking)
        verdict, rel, rout, reason = decide(prim[i], float(q[i]), rho, striking, comp, th)
        holds = prompt_holds(verdict, prim[i].per_prompt, rho.per_prompt, comp, partner_e, th)
        share = float(holds.nanmean()) if torch.isfinite(holds).any() else float("nan")
        ko = {k: effect(label(k, h)) for k in ("remove", "keep", "renorm")}
        dir_e = effect(label("direct", h)) if direct else Estimate.nan(n)
        carriers = _carriers(h, source_names, values, m0, den, prim[i], n_boot, seed)
        head_rows.append(
            head_row(
                h,
                claims,
                prompts,
                est,
                ko,
                rho,
                dir_e,
                comp,
                verdict,
                share,
                rel,
                rout,
                reason,
                float(p[i]),
                float(q[i]),
                carriers,
            )
        )
        per_prompt[h] = (est, rho)
    edges = edge_rows(
        heads,
        claims,
        engine,
        prompts,
        read_pos,
        sources,
        source_names,
        values,
        m0,
        den,
        n_boot,
        seed,
    )

    tensors = {
        "clean_metric": m0,
        "pattern_example": claims.patterns[0],
        "example_tokens": prompts.tokens[0],
        "routing_per_prompt": torch.stack([per_prompt[h][1].per_prompt for h in heads]).reshape(
            adapter.n_layers, adapter.n_heads, n
        ),
    }
    if prompts.corrupted is not None:
        tensors["corrupted_metric"] = engine.corrupted
    for m in methods:
        tensors[f"effect_{m.value}_per_prompt"] = torch.stack(
            [per_prompt[h][0][m.value].per_prompt for h in heads]
        ).reshape(adapter.n_layers, adapter.n_heads, n)
    if prompts.aligned:
        tensors["pattern_mean"] = claims.patterns.mean(0)
    meta = _meta(
        adapter,
        prompts,
        metric,
        task_name,
        primary,
        methods,
        reference,
        thr,
        seed,
        n_boot,
        time.time() - t0,
    )
    return Audit(heads=_frame(head_rows), edges=edges, tensors=tensors, meta=meta)


def _resolve_task(task, metric, n_prompts, seed) -> tuple[PromptSet, object, str]:
    if isinstance(task, str):
        task = _tasks.get(task)
    if isinstance(task, _tasks.Task):
        return task.prompts(n_prompts, seed), as_metric(metric or task.metric()), task.name
    if isinstance(task, PromptSet):
        if metric is None:
            raise ValueError("metric: required when auditing a bare PromptSet")
        return task, as_metric(metric), task.name
    raise TypeError(f"task: expected a task name, Task or PromptSet, got {type(task).__name__}")


def _patterns_from_cache(adapter: Adapter, cache, prompts: PromptSet) -> list[torch.Tensor]:
    pats = adapter.patterns_from_cache(cache)
    want = (len(prompts), adapter.n_heads, prompts.n_pos, prompts.n_pos)
    if tuple(pats[0].shape) != want:
        raise ValueError(
            f"cache: patterns of shape {tuple(pats[0].shape)}, expected {want} for these prompts"
        )
    return pats


def _compensation(h, cands, values, m0, den, direct, primary, n_boot, seed, th, e_h):
    best, best_e = None, None
    for c in cands:
        lbl = label("joint-" + primary.value, *sorted((h, c)))
        if lbl not in values:
            continue
        solo_c = values[label(primary.value, c)]
        joint = ratio_of_means(values[lbl] - m0, den, n_boot=n_boot, seed=seed, label=lbl)
        inter = ratio_of_means(
            values[lbl] - values[label(primary.value, h)] - solo_c + m0,
            den,
            n_boot=n_boot,
            seed=seed,
            label="i" + lbl,
        )
        cand = Compensation(tuple(c), joint, inter, None)
        if best is None or joint.value > best.joint.value:
            best = cand
            best_e = ratio_of_means(solo_c - m0, den, n_boot=10, seed=seed).per_prompt
    d = None
    if direct:
        d = ratio_of_means(
            values[label("direct", h)] - values[label("zero", h)],
            den,
            n_boot=n_boot,
            seed=seed,
            label=label("dmt", h),
        )
    if best is None:
        return (Compensation(None, None, None, d) if d is not None else None), None
    return Compensation(best.partner, best.joint, best.interaction, d), best_e


def _carriers(h, names, values, m0, den, e_h, n_boot, seed) -> str:
    """Sources whose single-edge removal carries at least half of the head's effect."""
    if math.isnan(e_h.value) or abs(e_h.value) < 1e-9:
        return ""
    out = []
    for j, name in enumerate(names):
        lbl = label("edge", h, extra=f"@{j}")
        e = ratio_of_means(values[lbl] - m0, den, n_boot=10, seed=seed).value
        if not math.isnan(e) and e / e_h.value >= 0.5:
            out.append(name)
    return ",".join(out)


def _frame(rows):
    import pandas as pd

    return pd.DataFrame(rows)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = {"lensattr": __version__, "torch": torch.__version__}
    for dist in ("transformer-lens", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _meta(
    adapter, prompts, metric, task_name, primary, methods, reference, thr, seed, n_boot, seconds
):
    return {
        "model": adapter.name,
        "model_config_hash": adapter.config_hash(),
        "n_layers": adapter.n_layers,
        "n_heads": adapter.n_heads,
        "task": task_name,
        "n_prompts": len(prompts),
        "prompts_hash": prompts.hash(),
        "metric": as_metric(metric).describe(),
        "primary_ablation": primary.value,
        "ablation_methods": [m.value for m in methods],
        "effect_reference": reference,
        "effect_definition": "e = mean(m_int - m0) / mean(m_ref - m0); 0 = no change, "
        "1 = as far as the reference run",
        "routing_definition": "rho = mean(m(keep only C) - m(zero)) / mean(m0 - m(zero))",
        "claimed_set": "fewest non-sink sources covering >= 50% of the row; sink if they cannot",
        "thresholds": thr,
        "seed": seed,
        "n_boot": n_boot,
        "seconds": round(seconds, 3),
        "versions": _versions(),
        "tensor_axes": {
            "clean_metric": "[batch]",
            "corrupted_metric": "[batch]",
            "pattern_example": "[layer, head_index, query_pos, key_pos] (prompt 0)",
            "example_tokens": "[pos] (prompt 0)",
            "pattern_mean": "[layer, head_index, query_pos, key_pos] mean over prompts",
            "routing_per_prompt": "[layer, head_index, batch]",
            "effect_<method>_per_prompt": "[layer, head_index, batch]",
        },
    }
