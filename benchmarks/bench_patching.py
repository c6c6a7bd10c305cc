"""Activation patching of head outputs: ``lensattr.evidence.activation_patching`` against
TransformerLens's ``get_act_patch_attn_head_out_by_pos`` / ``..._all_pos``.

The quantity: patch each head's clean ``z`` into the corrupted run, by position (768 cells:
4 layers x 24 positions x 8 heads) and at all positions (32 cells), and read the logit
difference at the last position of each of the 8 prompts (per-prompt values, TL's
``reduce="none"``). The set-up is ``bench_head_patching.py``'s (DESIGN.md's configuration: GPT-2
style, 4 layers x 8 heads, d_model 256, vocabulary 30,522, random weights, 8 prompts x 24
tokens, corrupted at positions 5, 11, 17).

* TransformerLens: ``run_with_cache(clean)`` + ``get_act_patch_attn_head_out_by_pos(model,
  corrupted, cache, metric, reduce="none")``: one full bridge forward of the 8 prompts per cell.
* lensattr: ``activation_patching(model, prompts, LogitDiff(), site="z", by="pos")``: both
  reference runs, then many cells per forward on the hook-free forward, each from the patched
  layer and position on, with only the two logit columns the metric reads.

Both run in this process on the same inputs, interleaved (TL, lensattr, TL, ...), so load from
other processes hits both alike; reported: medians (and mins) of ``--runs`` rounds, the ratio,
the max abs difference of the per-prompt values, and each call's peak RSS above the memory
held before it (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each call;
torch allocates outside tracemalloc). Run: ``python benchmarks/bench_patching.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformer_lens import patching  # noqa: E402

from lensattr import LogitDiff, PromptSet  # noqa: E402
from lensattr.evidence.patching import activation_patching  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_head_patching import (  # noqa: E402
    _reset_peak,
    _status_kb,
    build_inputs,
    build_model,
)


def tl_side(model, inputs, by: str):
    rows = torch.arange(inputs["clean"].shape[0])

    def metric(logits):  # [batch, pos, d_vocab] -> [batch]
        last = logits[:, -1]
        return last[rows, inputs["answers"]] - last[rows, inputs["wrong"]]

    fn = {"pos": patching.get_act_patch_attn_head_out_by_pos,
          "all": patching.get_act_patch_attn_head_out_all_pos}[by]

    def run():
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs["clean"])
            return fn(model, inputs["corrupted"], cache, metric, reduce="none").values
    return run


def lensattr_side(model, inputs, by: str, batch_size: int):
    prompts = PromptSet(tokens=inputs["clean"], corrupted=inputs["corrupted"],
                        answers=inputs["answers"], wrong=inputs["wrong"])

    def run():
        return activation_patching(model, prompts, LogitDiff(), site="z", by=by,
                                   batch_size=batch_size).values
    return run


def measure(fn):
    """(seconds, extra peak RSS in MB or None, result)."""
    before = _status_kb("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    mb = (peak - before) / 1024 if reset and peak is not None and before is not None else None
    return dt, mb, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--by", default="pos,all")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, inputs = build_model(), build_inputs()
    with torch.no_grad():
        model(inputs["clean"][:1])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"threads {args.threads}; load average {load:.1f} on {os.cpu_count()} CPUs "
          "(shared machine: medians of interleaved runs)")
    print("| sweep | TL median (min) | lensattr median (min) | ratio median (min) | "
          "max abs diff | peak RSS TL / lensattr |")
    print("|---|---|---|---|---|---|")
    for by in args.by.split(","):
        sides = {"tl": tl_side(model, inputs, by),
                 "ls": lensattr_side(model, inputs, by, args.batch_size)}
        times = {k: [] for k in sides}
        mem = {k: [] for k in sides}
        outs = {}
        for _ in range(args.runs):
            for k, fn in sides.items():
                dt, mb, outs[k] = measure(fn)
                times[k].append(dt)
                if mb is not None:
                    mem[k].append(mb)
        diff = (outs["tl"].float() - outs["ls"].float()).abs().max().item()
        med = {k: statistics.median(v) for k, v in times.items()}
        mn = {k: min(v) for k, v in times.items()}
        mems = " / ".join(f"{max(mem[k]):.0f} MB" if mem[k] else "n/a" for k in ("tl", "ls"))
        cells = outs["ls"].shape[:-1].numel()
        print(f"| head out, {by} ({cells} cells) | {med['tl']:.2f} s ({mn['tl']:.2f}) | "
              f"{med['ls']:.3f} s ({mn['ls']:.3f}) | {med['tl'] / med['ls']:.1f}x "
              f"({mn['tl'] / mn['ls']:.1f}x) | {diff:.2e} | {mems} |")
        print(f"  runs: TL {[round(t, 2) for t in times['tl']]}, "
              f"lensattr {[round(t, 3) for t in times['ls']]}")
        assert diff <= 1e-4, f"results differ: {diff}"


if __name__ == "__main__":
    main()
