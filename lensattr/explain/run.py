"""``explanation_tests``: the classic tests of attention-as-explanation in one call."""

from __future__ import annotations

import time

from ..core.version import __version__
from .adversarial import adversarial_from
from .attributions import METHODS, attributions_from, check_methods
from .baselines import baselines_from
from .claims_vs_importance import CLAIMS, agreement_table, layer_claims
from .edits import units_from
from .permute import permuted_from
from .result import ExplanationTests
from .setup import prepare

__all__ = ["explanation_tests", "TESTS"]

TESTS = ("permuted", "baselines", "adversarial", "attributions")


def explanation_tests(
    model,
    task,
    metric=None,
    *,
    tests=TESTS,
    heads=None,
    layers="all",
    adversarial_heads=None,
    eps: float | None = None,
    n_prompts: int | None = None,
    seed: int = 0,
    rows: str = "read",
    n_permutations: int = 50,
    frozen: str = "auto",
    steps: int = 100,
    restarts: int = 2,
    methods=METHODS,
    claims=CLAIMS,
    n_steps: int = 32,
    n_samples: int = 200,
    n_boot: int = 1000,
    batch_size: int = 64,
) -> ExplanationTests:
    """Run the tests of attention-as-explanation on ``model`` and ``task``.

    Args:
        model: a TransformerBridge (or Adapter); models without per-head attention patterns
            are refused.
        task: a task name, :class:`~lensattr.tasks.Task` or :class:`~lensattr.PromptSet`
            (then ``metric`` is required).
        tests: some of ``permuted`` (Jain & Wallace), ``baselines`` (Wiegreffe & Pinter
            uniform and frozen attention), ``adversarial`` (Jain & Wallace) and
            ``attributions`` (token importance by captum vs attention claims per layer).
        heads: heads for the per-head tests (default every head); ``layers``: layers whose
            heads are edited all at once (``"all"``, a list, or None).
        adversarial_heads: heads for the adversarial search (default ``heads``).
        eps: the metric change that counts as "unchanged", in the metric's units (default
            5% of the mean |clean metric|, recorded in ``meta``).
        rows: ``"read"`` edits the query rows the metric reads, ``"all"`` every real row.
    """
    tests = (tests,) if isinstance(tests, str) else tuple(tests)
    bad = [t for t in tests if t not in TESTS]
    if bad or not tests:
        raise ValueError(f"tests: expected some of {TESTS}, got {tests!r}")
    if "attributions" in tests:
        methods = check_methods(methods)
    s = prepare(model, task, metric, n_prompts, seed, rows, eps, batch_size)
    units = units_from(s.adapter, heads, layers) if {"permuted", "baselines"} & set(tests) \
        else []
    adv = units_from(s.adapter, heads if adversarial_heads is None else adversarial_heads, None) \
        if "adversarial" in tests else []
    tables: dict = {}
    tensors: dict = {}
    seconds: dict = {}
    params: dict = {}
    out = (tables, tensors, seconds, params)
    for name in ("permuted", "baselines", "adversarial"):
        if name in tests:
            _edit_test(name, s, units, adv, out, n_permutations=n_permutations, frozen=frozen,
                       steps=steps, restarts=restarts, seed=seed)
    if "attributions" in tests:
        _attribution_test(s, out, methods, claims, n_steps, n_samples, n_boot, batch_size, seed)
    meta = {**s.meta(), "method": "explanation_tests", "tests": list(tests), "seed": seed,
            "seconds": seconds, "params": params, "lensattr_version": __version__}
    return ExplanationTests(tables, tensors, meta)


def _edit_test(name, s, units, adv, out, *, n_permutations, frozen, steps, restarts, seed):
    """One of the attention-editing tests; its tables, tensors, time and parameters into
    ``out`` = (tables, tensors, seconds, params)."""
    tables, tensors, seconds, params = out
    t0 = time.perf_counter()
    if name == "permuted":
        t = permuted_from(s, units, n_permutations, seed)
    elif name == "baselines":
        t = baselines_from(s, units, frozen)
    else:
        t = adversarial_from(s, adv, steps=steps, restarts=restarts, seed=seed)
    seconds[name] = time.perf_counter() - t0
    tables[name], tables[f"{name}_summary"] = t.frame, t.summary
    tensors.update(t.tensors)
    params[name] = {k: v for k, v in t.meta.items() if k not in s.meta()}


def _attribution_test(s, out, methods, claims, n_steps, n_samples, n_boot, batch_size, seed):
    """Token attributions (captum) against the attention claims per layer, into ``out``."""
    tables, tensors, seconds, params = out
    t0 = time.perf_counter()
    att = attributions_from(s, methods, n_steps, n_samples, min(batch_size, 16), seed)
    c = layer_claims(s, claims)
    tables["attributions"] = att.to_frame()
    tables["agreement"] = agreement_table(c, att.scores, n_boot, seed)
    tensors.update({f"scores.{k}": v for k, v in att.scores.items()})
    seconds["attributions"] = time.perf_counter() - t0
    params["attributions"] = {k: v for k, v in att.meta.items() if k not in s.meta()}
    params["attributions"]["claims"] = list(c)
    params["attributions"]["claims_skipped"] = [x for x in claims if x not in c]
