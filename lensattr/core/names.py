"""Stable names of lensattr's classes for fingerprints.

Digests of interventions and the run identities that key checkpoints name classes by module and
qualified name. Issue 18 moved the modules (``lensattr.types`` -> ``lensattr.core.types``, ...);
fingerprints keep the names from before the move, so a checkpoint written by an older lensattr
is still found and a saved digest still matches. New modules keep their own name."""

from __future__ import annotations

__all__ = ["stable_name"]

# module now -> module before the move (a class not listed keeps its module's name)
_MOVED = {
    "lensattr.core.types": "lensattr.types",
    "lensattr.core.sites": "lensattr.model",
    "lensattr.core.prompts": "lensattr.prompts",
    "lensattr.core.metrics": "lensattr.metrics",
    "lensattr.core.metric": "lensattr.metrics",
    "lensattr.stats.inference": "lensattr.compare.stats",
    "lensattr.stats.ratio": "lensattr.compare.ratio",
    "lensattr.stats.selection": "lensattr.compare.selection",
    "lensattr.stats.agreement": "lensattr.compare.agreement",
    "lensattr.models.adapter": "lensattr.model",
    "lensattr.models.errors": "lensattr.model",
    "lensattr.models.weights": "lensattr.model",
    "lensattr.models.readout": "lensattr.model",
    "lensattr.models.identity": "lensattr.model",
    "lensattr.models.hooks": "lensattr.model",
    "lensattr.evidence.engine_result": "lensattr.evidence.engine",
    "lensattr.evidence.chunk_plan": "lensattr.evidence.engine",
    "lensattr.evidence.chunk_forward": "lensattr.evidence.engine",
    "lensattr.models.loading": "lensattr.loading",
    "lensattr.tasks.bundled": "lensattr.tasks",
    "lensattr.tasks.text": "lensattr.tasks_text",
    "lensattr.claims.sources": "lensattr.claim_sources",
    "lensattr.claims.values": "lensattr.value_claims",
    "lensattr.compare.token_importance": "lensattr.token_importance",
    "lensattr.compare.screening": "lensattr.screening",
    "lensattr.compare.locus": "lensattr.locus",
    "lensattr.compare.records": "lensattr.compare.verdicts",
}
_MOVED_CLASSES = {("lensattr.core.metric", "FnMetric"): "lensattr.metric_fn"}


def stable_name(obj) -> str:
    """``module.qualname`` of a class or function, with lensattr's pre-move module paths."""
    mod = getattr(obj, "__module__", "") or ""
    qual = getattr(obj, "__qualname__", type(obj).__name__)
    if mod.startswith("lensattr.models.zoo."):
        mod = "lensattr.zoo." + mod[len("lensattr.models.zoo."):]
    mod = _MOVED_CLASSES.get((mod, qual), _MOVED.get(mod, mod))
    return f"{mod}.{qual}"
