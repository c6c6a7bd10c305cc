"""The audit's ``meta``: what ran, on what, under which definitions and versions."""

from __future__ import annotations

import json

import torch

from ..claims.head_types import SINK_ROLES
from ..core.metrics import as_metric
from ..stats.agreement import EFFECT_NOISE

__all__ = ["audit_meta", "run_meta"]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from ..core.version import __version__

    out = {"lensattr": __version__, "torch": torch.__version__}
    for dist in ("transformer-lens", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def audit_meta(
    adapter, prompts, metric, task_name, primary, methods, reference, th, seed, seconds
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
        "padding_side": prompts.padding_side,
        "metric": as_metric(metric).describe(),
        "primary_ablation": primary.value,
        "ablation_methods": [m.value for m in methods],
        "mean_ablation": "mean of the head's hook_z over the prompt set at each position",
        "resample_pairing": "each prompt with its own corrupted prompt (one draw)",
        "effect_reference": reference,
        "effect_definition": "e = mean(m_int - m0) / mean(m_ref - m0); 0 = no change, "
        "1 = as far as the reference run",
        "routing_definition": "rho = mean(m(keep only C) - m(ablated)) / mean(m0 - m(ablated)), "
        "keep-only and ablation under the same baseline",
        "edge_edit": "alpha[q, s] = 0 without renormalising (= subtracting alpha*v*W_O terms); "
        "under mean/resample the removed terms are replaced by their mean/corrupted "
        "counterparts",
        "pattern_edit": "effect_pattern / pattern_read: only the attention weights alpha[q, s] "
        "of the edge / of the whole read row replaced by the baseline's (corrupted prompt's, "
        "or prompt-set mean), the run's values kept, no renormalising (pattern patching, "
        "noising); not computed under the zero baseline, where it is the removal itself",
        "claimed_set": "fewest non-sink sources covering >= 50% of the row's non-sink mass; "
        "keep-only removes every other source, the sink's terms too (rho measures C alone); "
        "the sink's share (sink_share = sink_effect / effect) and C's necessity (necessity = "
        "knockout_claimed / effect) are ratios of means with their intervals",
        "selected_intervals": "routing, sink_share and necessity intervals of relevant heads "
        "at the false-coverage-rate level 1 - alpha * R / m (Benjamini-Yekutieli; R relevant "
        "of m heads, interval_level); null heads' effect intervals at 1 - alpha * R0 / m for "
        "R0 heads selected by the equivalence test",
        "verdict_baseline": "every number behind a label uses one baseline; the label follows "
        "the primary, the others are in labels_by_baseline / compensated_under",
        "thresholds": th.to_dict(),
        "seed": seed,
        "confidence_intervals": "Fieller 95% (t, n - 1 df) for every ratio of means over "
        "prompts; unbounded (+-inf) when the denominator is not significantly non-zero",
        "null_test": "TOST |e| < delta (Fieller/t), Benjamini-Hochberg across heads",
        "relevance_test": "exact sign-flip (n <= 16; Monte Carlo above), BH across heads",
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


def run_meta(plan, g, cc, atp_meta: dict, floor: float, seconds: float) -> dict:
    """The whole ``meta`` of an audit: :func:`audit_meta` and what the run found and used
    (``plan``: the AuditPlan, ``g``: the Gathered evidence, ``cc``: the claim columns)."""
    adapter, prompts, engine = plan.adapter, plan.prompts, g.engine
    meta = audit_meta(adapter, prompts, plan.metric, plan.task_name, plan.primary,
                      plan.methods, g.reference, plan.thresholds, plan.seed, seconds)
    meta["prompts_hash"] = plan.given_hash
    meta["sink_roles"] = [r for r in SINK_ROLES if r in prompts.roles]
    meta["heads_audited"] = [list(h) for h in plan.heads]
    meta["agreement"] = json.loads(cc.agreement.to_json(orient="records"))
    meta.update(cc.meta)
    meta["min_prompts_for_a_verdict"] = plan.min_prompts
    meta["effect_noise_floor"] = floor
    meta["effect_noise_floor_definition"] = (
        f"{EFFECT_NOISE} x (max |m0| + 1) / |mean(m_ref - m0)|: normalised effects below it are "
        "float32 rounding (two exact engines differ by up to that much) and rank as 0 in the "
        "agreement statistics (agree_*, Audit.agreement, meta['atp'])")
    meta["weight_processing"] = adapter.weight_processing()
    meta["screening"] = g.screening.record
    meta["atp"] = atp_meta
    meta["engine"] = {
        "path": "hook-free" if engine.fast else "bridge",
        "why_not_hook_free": engine.fast_reason,
        "rows": dict(engine.n_rows),
        "forward_work": round(engine.work, 2),
        "forward_work_unit": "one clean forward pass of one prompt (layers x positions run "
        "by the edits: from the first edited layer and query position on)",
        "threads": torch.get_num_threads(),
        **engine.world.describe(),  # world_size 1 alone; rows and work are over every rank
        "dtype": str(adapter.dtype).removeprefix("torch."),
    }
    tok = getattr(adapter.model, "tokenizer", None)
    if tok is not None:  # the example prompt as text, for the report
        meta["example_text_tokens"] = [tok.decode([i]) for i in prompts.tokens[0].tolist()]
    return meta
