"""A synthetic but valid :class:`~lensattr.Audit` of any shape, for tests and for measuring
the report's size and load time at scale (e.g. SmolLM2's 30 × 9 heads) without running a slow
audit. Every number is random; nothing here is a finding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .result import Audit

__all__ = ["synthetic_audit"]

_VERDICTS = ["faithful", "misleading", "through_sink", "partial", "compensated", "inert",
             "negligible", "undetermined"]


def _ci(rng: np.random.Generator, x: np.ndarray, name: str) -> dict:
    w = rng.uniform(0.005, 0.08, size=x.shape)
    return {name: x, f"{name}_lo": x - w, f"{name}_hi": x + w}


def synthetic_audit(n_layers: int = 2, n_heads: int = 4, n_tokens: int = 8, *, seed: int = 0,
                    tokens: list[str] | None = None, template: Audit | None = None) -> Audit:
    """Random heads/edges tables, causal patterns and metrics of the given shape.

    tokens: the example prompt's token strings (default ``t0 ...``; its length sets n_tokens).
    template: a real audit whose heads and edges rows are resampled (so every column a real
    audit has is present), with layer/head and effects replaced.
    """
    if n_layers < 1 or n_heads < 1:
        raise ValueError(f"n_layers, n_heads: expected >= 1, got {n_layers}, {n_heads}")
    rng = np.random.default_rng(seed)
    tokens = list(tokens) if tokens is not None else [f"t{i}" for i in range(n_tokens)]
    n_tokens = len(tokens)
    n = n_layers * n_heads
    layer, head = np.divmod(np.arange(n), n_heads)
    eff = rng.normal(0, 0.02, n) + (rng.random(n) < 0.1) * rng.uniform(0.1, 0.5, n)
    verdict = rng.choice(_VERDICTS, n, p=[0.1, 0.05, 0.02, 0.05, 0.05, 0.25, 0.38, 0.1])
    if template is not None:
        pick = rng.integers(0, len(template.heads), n)
        heads = template.heads.iloc[pick].reset_index(drop=True).copy()
        src = list(zip(template.heads["layer"].iloc[pick], template.heads["head"].iloc[pick],
                       strict=True))
    else:
        heads = pd.DataFrame({"head_type_read": rng.choice(["previous_token", "sink", "none"], n),
                              "top_source": rng.choice(["BOS", "S1", "S2", "END"], n),
                              "top_mass": rng.uniform(0.2, 1.0, n)})
        src = []
    heads["layer"], heads["head"] = layer, head
    for b in ("zero", "mean", "resample"):
        for k, v in _ci(rng, eff + rng.normal(0, 0.01, n), f"ablation_{b}").items():
            heads[k] = v
    for k, v in _ci(rng, rng.uniform(-0.2, 1.2, n), "routing").items():
        heads[k] = v
    heads["verdict"] = verdict
    heads["reason"] = [f"synthetic head L{a}H{b}: {v}, effect {e:.3f}"
                       for a, b, v, e in zip(layer, head, verdict, eff, strict=True)]
    heads = heads[["layer", "head"] + [c for c in heads.columns if c not in ("layer", "head")]]
    rows = []
    for i in range(n):
        if template is not None:
            t = template.edges
            part = t[(t["layer"] == src[i][0]) & (t["head"] == src[i][1])].copy()
            part["layer"], part["head"] = layer[i], head[i]
            rows.append(part)
        else:
            k = min(n_tokens, 6)
            att = rng.dirichlet(np.ones(k))
            rows.append(pd.DataFrame({
                "layer": layer[i], "head": head[i], "query_role": "END",
                "source_role": [f"pos{j}" for j in range(k)], "source_pos": np.arange(k),
                "attention": att, **_ci(rng, att * eff[i], "effect_remove")}))
    edges = pd.concat(rows, ignore_index=True)
    scores = torch.from_numpy(rng.normal(0, 2, (n_layers, n_heads, n_tokens, n_tokens)))
    scores = scores.masked_fill(torch.ones(n_tokens, n_tokens).triu(1).bool(), -torch.inf)
    pattern = scores.softmax(-1).float()
    n_prompts = 16
    clean = torch.from_numpy(rng.normal(3.0, 0.5, n_prompts)).float()
    tensors = {"pattern_example": pattern, "pattern_mean": pattern.mean(1, keepdim=True)
               .expand_as(pattern).contiguous(), "example_tokens": torch.arange(n_tokens),
               "clean_metric": clean, "corrupted_metric": clean - 3.0}
    meta = {"model": f"synthetic-{n_layers}x{n_heads}", "task": "synthetic", "n_prompts":
            n_prompts, "metric": {"name": "logit_diff", "position": "END"},
            "primary_ablation": "resample", "example_text_tokens": tokens,
            "note": "synthetic tables for tests and size measurements; not a finding"}
    return Audit(heads=heads, edges=edges, tensors=tensors, meta=meta)
