"""Abnar & Zuidema (2020), Table 1 style: which attention-based token importance agrees with the
causal importance of input tokens, per layer?

For each (model, task): token importance claimed at the metric's read rows by raw attention
(layer l's head-averaged pattern), attention rollout and attention flow (up to and including
layer l; 0.5 I + 0.5 A), against occlusion of one input token at the embedding (its token
embedding zeroed, or replaced by the corrupted prompt's token there), measured as the metric's
change. Spearman rho within each prompt over its real positions, averaged over prompts, with
95% bootstrap CIs over prompts (:meth:`lensattr.token_importance.TokenImportance.agreement`).

Models: ``planted`` (planted-copy, 32 prompts), ``attn2`` (induction, 16 prompts), the real
all-MiniLM-L6-v2 on ``minilm-token`` (read row TOK) and ``minilm-similarity`` (mean-pooled:
every real token is a read row; 12 prompts, flow over every row).

Writes ``experiments/results/token_agreement.{md,csv}``. Run:
``python experiments/token_agreement.py`` (needs ``pip install "lensattr[minilm,flow]"``;
about a minute on 2 CPU cores).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pandas as pd
import torch

import lensattr
from lensattr.compare.token_importance import token_importance

OUT = Path(__file__).parent / "results"
RUNS = [("planted", "planted-copy", None), ("attn2", "induction", 16),
        ("minilm", "minilm-token", None), ("minilm", "minilm-similarity", 12)]


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    frames, models = [], {}
    for model_name, task_name, n in RUNS:
        model = models.setdefault(model_name, lensattr.load_model(model_name))
        task = lensattr.tasks.get(task_name)
        prompts = task.prompts(n, 0, model)
        t0 = time.time()
        ti = token_importance(model, prompts, task.metric(), claims=["raw", "rollout", "flow"])
        ag = ti.agreement(seed=0, n_boot=1000)
        ag.insert(0, "model", model_name)
        ag.insert(1, "task", task_name)
        ag["seconds"] = round(time.time() - t0, 1)
        frames.append(ag)
        print(f"{model_name} / {task_name}: {len(prompts)} prompts, {time.time() - t0:.1f} s")
    df = pd.concat(frames, ignore_index=True)
    OUT.mkdir(exist_ok=True)
    df.to_csv(OUT / "token_agreement.csv", index=False)
    (OUT / "token_agreement.md").write_text(to_markdown(df))
    print(to_markdown(df))


def to_markdown(df: pd.DataFrame) -> str:
    lines = ["# Token importance: attention, rollout and flow vs occlusion (Spearman rho)", "",
             "Per layer l: claim at the read rows up to layer l (attention: layer l alone) vs "
             "|metric change| when one input token's embedding is occluded; rho within each "
             "prompt, mean over prompts [95% bootstrap CI over prompts]. Written by "
             "`experiments/token_agreement.py`.", ""]
    for (model, task, ev), g in df.groupby(["model", "task", "evidence"], sort=False):
        lines += [f"## {model} / {task}: {ev} ({int(g.n_prompts.iloc[0])} prompts)", "",
                  "| layer | attention | rollout | flow |", "|---|---|---|---|"]
        for layer, gl in g.groupby("layer"):
            cell = {r.claim: f"{r.rho:.2f} [{r.rho_lo:.2f}, {r.rho_hi:.2f}]"
                    for r in gl.itertuples()}
            lines.append(f"| {layer} | " + " | ".join(cell.get(c, "") for c in
                                                       ("attention", "rollout", "flow")) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
