"""Attribution patching: lensattr's ``atp`` against TransformerLens's ``attribution_patch``.

The quantity: the first-order (attribution-patching) score of every head's output (hook_z)
at every position, denoising convention (TL's), mean over 32 prompt pairs, metric = logit
difference at the last position.

* TransformerLens: ``transformer_lens.tools.analysis.attribution_patch(model, clean[i:i+1],
  corrupted[i:i+1], metric_i)`` looped over the 32 pairs, as a user would (its metric reads
  one example's logits), and its ``attn_head_out`` node scores averaged over the pairs.
* lensattr: ``atp(model, PromptSet(clean, corrupted, answers, wrong), LogitDiff(),
  mode="tl", qk_fix=False)`` (32 prompts per forward/backward): ``heads_by_pos.mean(0)``.
  Also timed: the default (noising, AtP* softmax fix for queries and keys, every edge) and
  with GradDrop.

Same model, same tokens, same process, interleaved rounds; the script asserts equality
(max abs diff <= 1e-5). Peak memory per side in a fresh subprocess (as in
``bench_head_patching.py``).

Run: ``python benchmarks/bench_attribution.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from bench_head_patching import (  # noqa: E402
    D_MODEL,
    D_VOCAB,
    N_HEADS,
    N_LAYERS,
    _reset_peak,
    _status_kb,
    build_model,
    interleaved,
)
from transformer_lens.tools.analysis import attribution_patch  # noqa: E402

from lensattr import LogitDiff, PromptSet, atp  # noqa: E402

N_PROMPTS, N_POS = 32, 24
TOLERANCE = 1e-5


def build_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """32 prompts x 24 random token ids (BOS = 0 first); corrupted differs at 3 positions."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, D_VOCAB, (N_PROMPTS, N_POS), generator=g)  # [batch, pos]
    clean[:, 0] = 0
    corrupted = clean.clone()
    corrupted[:, [5, 11, 17]] = torch.randint(1, D_VOCAB, (N_PROMPTS, 3), generator=g)
    return {"clean": clean, "corrupted": corrupted,
            "answers": torch.randint(1, D_VOCAB, (N_PROMPTS,), generator=g),
            "wrong": torch.randint(1, D_VOCAB, (N_PROMPTS,), generator=g)}


def run_tl(model, x) -> torch.Tensor:
    """TL, one pair at a time. Returns the mean head-output node scores [layer, pos, head]."""
    out = torch.zeros(N_LAYERS, N_POS, N_HEADS, dtype=torch.float64)
    for i in range(N_PROMPTS):
        a, w = int(x["answers"][i]), int(x["wrong"][i])

        def metric(logits, a=a, w=w):  # [1, pos, d_vocab]
            return logits[0, -1, a] - logits[0, -1, w]

        res = attribution_patch(model, x["clean"][i:i + 1], x["corrupted"][i:i + 1], metric)
        for node, v in res.node_scores.items():
            if node.kind == "attn_head_out":
                out[node.layer, node.position, node.head] += v / N_PROMPTS
    return out


def prompts(x) -> PromptSet:
    return PromptSet(tokens=x["clean"], corrupted=x["corrupted"], answers=x["answers"],
                     wrong=x["wrong"])


def run_lensattr(model, x, **kw):
    return atp(model, prompts(x), LogitDiff(), **kw)


VARIANTS = {
    "tl": None,
    "lensattr tl-mode": dict(mode="tl", qk_fix=False),
    "lensattr default": dict(),  # noising, AtP* q/k fix, edges
    "lensattr +graddrop": dict(graddrop=True),
}


def call(name, model, x):
    return run_tl(model, x) if name == "tl" else run_lensattr(model, x, **VARIANTS[name])


def worker(name: str) -> None:
    model, x = build_model(), build_inputs()
    with torch.no_grad():
        model(x["clean"][:1])
    rss0 = _status_kb("VmRSS")
    exact = _reset_peak() and rss0 is not None
    t0 = time.perf_counter()
    call(name, model, x)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    print("RESULT " + json.dumps({"seconds": seconds, "exact": exact,
                                  "rss_before_mb": (rss0 or 0) / 1024,
                                  "delta_mb": ((peak or 0) - (rss0 or 0)) / 1024}))


def memory(name: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name,
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"memory worker {name!r} failed:\n{proc.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f} (a shared machine: other jobs were running)")
    model, x = build_model(), build_inputs()
    print(f"model: {N_LAYERS} layers x {N_HEADS} heads, d_model {D_MODEL}, vocab {D_VOCAB} "
          f"(random GPT-2); prompts: {N_PROMPTS} x {N_POS} tokens; metric: logit difference")
    tl = run_tl(model, x)
    ours = run_lensattr(model, x, **VARIANTS["lensattr tl-mode"])
    mine = ours.heads_by_pos.mean(0).double()  # [layer, pos, head]
    diff = (mine - tl).abs().max().item()
    print(f"agreement (TL-convention mode): max |lensattr - TL| over {tl.numel()} head-position "
          f"nodes = {diff:.2e} (scores range {tl.min():.2e} .. {tl.max():.2e}); path "
          f"{ours.meta['path']!r}")
    assert diff <= TOLERANCE, diff
    for name in list(VARIANTS)[2:]:  # warm-up of the other variants
        call(name, model, x)
    fns = {name: (lambda name=name: call(name, model, x)) for name in VARIANTS}
    times = interleaved(fns, args.runs)
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    mem = {} if args.no_memory else {k: memory(k) for k in VARIANTS}
    print(f"\n{args.runs} interleaved rounds after 1 warm-up; medians (min..max)\n")
    print("| variant | median | min..max | TL / variant | extra peak RSS |")
    print("|---|---|---|---|---|")
    for k, v in times.items():
        wall = [w for w, _ in v]
        ratio = "—" if k == "tl" else f"{med['tl'] / med[k]:.1f}x"
        rss = f"{mem[k]['delta_mb']:.0f} MB" if k in mem else "—"
        print(f"| {k} | {med[k]:.3f} s | {min(wall):.3f}..{max(wall):.3f} s | {ratio} | {rss} |")
    if mem:
        print(f"\nmemory: each variant alone in a fresh subprocess, peak RSS above the "
              f"{mem['tl']['rss_before_mb']:.0f} MB held before the call (VmHWM reset: "
              f"{mem['tl']['exact']})")
    print(f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
