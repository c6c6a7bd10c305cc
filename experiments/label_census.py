"""Verdict census of the bundled models' audits (default prompts): one row per head with its
label, labels by baseline, flag, effect, routing, sink share and necessity.

``python experiments/label_census.py OUT.csv``; run it under two versions of lensattr
(``PYTHONPATH=<checkout>``) and compare the CSVs to see which labels changed
(``results/verdicts_issue17.md``)."""

import sys
import warnings

import pandas as pd

import lensattr

RUNS = [("planted", "planted-copy"), ("attn2", "induction"), ("attn2", "duplicate-token"),
        ("attn2", "previous-token"), ("gpt3l", "natural-text"), ("minilm", "minilm-similarity"),
        ("minilm", "minilm-token")]


def main(out: str) -> None:
    warnings.simplefilter("ignore")
    rows = []
    for model, task in RUNS:
        r = lensattr.audit(lensattr.load_model(model), task, progress=False)
        primary = r.meta["primary_ablation"]
        for x in r.heads.itertuples():
            rows.append({"model": model, "task": task, "layer": x.layer, "head": x.head,
                         "verdict": x.verdict, "labels": x.labels_by_baseline,
                         "flag": bool(x.baseline_sensitive), "routing": x.routing,
                         "sink_effect": x.sink_effect, "effect": getattr(x, "ablation_" + primary),
                         "sink_share": getattr(x, "sink_share", float("nan")),
                         "necessity": getattr(x, "necessity", float("nan")),
                         "rule": x.verdict_rule})
        print(model, task, r.heads.verdict.value_counts().to_dict(), flush=True)
    pd.DataFrame(rows).to_csv(out, index=False)


if __name__ == "__main__":
    main(sys.argv[1])
