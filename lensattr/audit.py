"""``audit(model, task)``: claims vs evidence for every head, with verdicts and statistics."""

from __future__ import annotations

import math
import time

import pandas as pd
import torch

from . import tasks as _tasks
from .audit_result import Audit
from .claims import compute_claims
from .compare.compensation import candidate_partners
from .compare.stats import Estimate, bh_qvalues, ratio_of_means, signflip_p
from .compare.verdicts import Compensation, Thresholds, decide, prompt_holds
from .evidence import Engine, ablate
from .evidence.sweeps import ablation_sweep, claim_sweep, edge_sweep, joint_sweep, label
from .metrics import as_metric
from .model import Adapter
from .prompts import PromptSet
from .tables import HeadResult, edge_rows, head_row, source_positions
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
    batch_size: int = 64,
    progress: bool = True,
    checkpoint: str | None = None,
    max_edge_sources: int = 24,
    heads=None,
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
        heads: audit only these heads (``HeadId`` or ``(layer, head)`` pairs); default every
            head. Multiple-testing correction and partner search run over the chosen heads;
            per-head tensors hold NaN for the others.
    """
    t0 = time.time()
    th = thresholds or Thresholds()
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    prompts, metric, task_name = _resolve_task(task, metric, n_prompts, seed, adapter.model)
    n = len(prompts)
    engine = Engine(
        adapter, prompts, metric, batch_size=batch_size, progress=progress, checkpoint=checkpoint
    )
    patterns = engine.patterns if cache is None else _patterns_from_cache(adapter, cache, prompts)
    read_pos = engine._read_pos(engine.readout)
    claims = compute_claims(patterns, prompts, read_pos, causal=adapter.is_causal)
    heads = _resolve_heads(adapter, heads)
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
        other.append(ablate(*heads, method=AblationMethod.ZERO, label="reference:all-zero"))
    sources, source_names = source_positions(prompts, claims, read_pos, max_edge_sources)
    other += edge_sweep(heads, read_pos, sources, prompts.n_pos)
    values.update(_run(engine, other, "claims and edges"))
    if prompts.corrupted is not None:
        den, reference = engine.corrupted - m0, "corrupted prompts (m_c - m0)"
    else:
        den, reference = values["reference:all-zero"] - m0, "all heads zero-ablated (no corrupted)"
    eff = Effects(values, m0, den, n_boot, seed)
    prim = [eff(label(primary.value, h)) for h in heads]
    p = signflip_p(torch.stack([values[label(primary.value, h)] - m0 for h in heads]), seed=seed)
    q = bh_qvalues(p)

    # ---- compensation partners (among candidates, not all pairs) --------------------------
    clean_norm = torch.stack([o.norm(dim=-1).mean(0) for o in engine.out_clean])  # [L, H]
    cands = candidate_partners(res.head_delta, clean_norm, heads)
    weak = [h for h, e in zip(heads, prim, strict=True) if not e.hi >= th.tau]
    pairs = sorted({tuple(sorted((h, c))) for h in weak for c in cands[h]})
    values.update(_run(engine, joint_sweep(pairs, primary), "partner pairs"))

    # ---- verdicts ------------------------------------------------------------------------
    results = []
    for i, h in enumerate(heads):
        rho = _routing(values, h, m0, eff, th, n_boot, seed)
        comp, partner_e = _compensation(h, cands[h], eff, primary, direct)
        striking = bool(claims.claim_score[h.layer, h.head] >= th.striking)
        verdict, rel, rout, reason = decide(prim[i], float(q[i]), rho, striking, comp, th)
        holds = prompt_holds(verdict, prim[i].per_prompt, rho.per_prompt, comp, partner_e, th)
        edge_est = [eff(label("edge", h, extra=f"@{j}")) for j in range(len(sources))]
        results.append(HeadResult(
            head=h,
            effects={m.value: eff(label(m.value, h)) for m in methods},
            knockouts={k: eff(label(k, h)) for k in ("remove", "keep", "renorm")},
            routing=rho,
            direct=eff(label("direct", h)) if direct else Estimate.nan(n),
            compensation=comp,
            verdict=verdict, relevance=rel, routing_class=rout, reason=reason,
            share=float(holds.nanmean()) if torch.isfinite(holds).any() else float("nan"),
            p=float(p[i]), q=float(q[i]),
            carriers=_carriers(edge_est, source_names, prim[i]),
            edges=edge_est,
        ))  # fmt: skip

    heads_df = pd.DataFrame([head_row(r, claims, prompts) for r in results])
    edges_df = edge_rows(results, claims, prompts, read_pos, sources, source_names)
    tensors = _tensors(results, claims, prompts, engine, methods, adapter)
    meta = _meta(
        adapter,
        prompts,
        metric,
        task_name,
        primary,
        methods,
        reference,
        th,
        seed,
        n_boot,
        time.time() - t0,
    )
    tok = getattr(adapter.model, "tokenizer", None)
    if tok is not None:  # the example prompt as text, for the report
        meta["example_text_tokens"] = [tok.decode([i]) for i in prompts.tokens[0].tolist()]
    return Audit(heads=heads_df, edges=edges_df, tensors=tensors, meta=meta)


class Effects:
    """Normalised effects e = mean(m_int - m0) / mean(m_ref - m0), cached by label."""

    def __init__(self, values, m0, den, n_boot, seed):
        self.values, self.m0, self.den = values, m0, den
        self.n_boot, self.seed, self._cache = n_boot, seed, {}

    def __call__(self, lbl: str) -> Estimate:
        if lbl not in self._cache:
            self._cache[lbl] = self.ratio(self.values[lbl] - self.m0, lbl)
        return self._cache[lbl]

    def ratio(self, num, lbl: str) -> Estimate:
        return ratio_of_means(num, self.den, n_boot=self.n_boot, seed=self.seed, label=lbl)


def _routing(values, h, m0, eff: Effects, th: Thresholds, n_boot: int, seed: int) -> Estimate:
    """rho = mean(m(keep only C) - m(zero)) / mean(m0 - m(zero)); undefined (NaN) when zero-
    ablating the head moves the metric by less than the null margin: nothing to route."""
    if not abs(eff(label("zero", h)).value) >= th.delta:
        return Estimate.nan(len(m0))
    zero = values[label("zero", h)]
    return ratio_of_means(values[label("keep", h)] - zero, m0 - zero, n_boot=n_boot, seed=seed,
                          label=label("rho", h))


def _run(engine, interventions, desc) -> dict:
    if not interventions:
        return {}
    res = engine.run(interventions, desc=desc)
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


def _resolve_heads(adapter: Adapter, heads) -> list:
    if heads is None:
        return adapter.heads()
    if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
        raise ValueError(f"heads: expected a list of HeadId(layer, head), got {heads!r}")
    chosen = [adapter.check_head(h, "heads") for h in heads]
    if not chosen:
        raise ValueError("heads: expected at least one head, got an empty list")
    if len(set(chosen)) != len(chosen):
        raise ValueError("heads: the same head is listed twice")
    return sorted(chosen)


def _resolve_task(task, metric, n_prompts, seed, model) -> tuple[PromptSet, object, str]:
    if isinstance(task, str):
        task = _tasks.get(task)
    if isinstance(task, _tasks.Task):
        prompts = task.prompts(n_prompts, seed, model)
        return prompts, as_metric(metric or task.metric()), task.name
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


def _compensation(h, cands, eff: Effects, primary, direct):
    """The best partner among the candidates (largest joint effect), and direct - total."""
    best, best_e = None, None
    v = eff.values
    for c in cands:
        lbl = label("joint-" + primary.value, *sorted((h, c)))
        if lbl not in v:
            continue
        joint = eff(lbl)
        if best is None or joint.value > best.joint.value:
            inter = eff.ratio(
                v[lbl] - v[label(primary.value, h)] - v[label(primary.value, c)] + eff.m0, "i" + lbl
            )
            best = Compensation(tuple(c), joint, inter, None)
            best_e = eff(label(primary.value, c)).per_prompt
    d = None
    if direct:
        d = eff.ratio(v[label("direct", h)] - v[label("zero", h)], label("dmt", h))
    if best is None:
        return (Compensation(None, None, None, d) if d is not None else None), None
    return Compensation(best.partner, best.joint, best.interaction, d), best_e


def _carriers(edge_est: list[Estimate], names: list[str], e_h: Estimate) -> str:
    """Sources whose single-edge removal carries at least half of the head's effect."""
    if math.isnan(e_h.value) or abs(e_h.value) < 1e-9:
        return ""
    return ",".join(
        n
        for n, e in zip(names, edge_est, strict=True)
        if not math.isnan(e.value) and e.value / e_h.value >= 0.5
    )


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
    adapter, prompts, metric, task_name, primary, methods, reference, th, seed, n_boot, seconds
):
    return {
        "model": adapter.name,
        "model_config_hash": adapter.config_hash(),
        "model_weights_hash": adapter.weights_hash(),
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "device": str(adapter.device),
        "n_layers": adapter.n_layers,
        "n_heads": adapter.n_heads,
        "task": task_name,
        "n_prompts": len(prompts),
        "prompts_hash": prompts.hash(),
        "metric": as_metric(metric).describe(),
        "primary_ablation": primary.value,
        "ablation_methods": [m.value for m in methods],
        "mean_ablation": "mean of the head's hook_z over the prompt set at each position",
        "resample_pairing": "each prompt with its own corrupted prompt (one draw)",
        "effect_reference": reference,
        "effect_definition": "e = mean(m_int - m0) / mean(m_ref - m0); 0 = no change, "
        "1 = as far as the reference run",
        "routing_definition": "rho = mean(m(keep only C) - m(zero)) / mean(m0 - m(zero))",
        "edge_edit": "alpha[q, s] = 0 without renormalising (= subtracting alpha*v*W_O terms)",
        "claimed_set": "fewest non-sink sources covering >= 50% of the row; sink if they cannot",
        "thresholds": th.to_dict(),
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
