"""Head-output patching: lensattr's batched Engine against TransformerLens's own function.

The quantity: for every attention head (4 layers x 8 heads), patch the head's clean ``z`` (all
positions) into the corrupted run and read the mean logit difference at the last position.

* TransformerLens: ``run_with_cache(clean)`` + ``patching.get_act_patch_attn_head_out_all_pos``
  (one forward of the 8 corrupted prompts per head: 32 forwards).
* lensattr: ``Engine(model, PromptSet(tokens=corrupted, corrupted=clean, ...), LogitDiff())``
  and ``engine.run([ablate(h, method="resample") for h in heads])``: resample-ablating a head of
  the corrupted run with its value on the paired clean prompt *is* patching clean into
  corrupted. Interventions are stacked along the batch (``batch_size`` rows per forward).

Both run in this process on the same model and tokens, interleaved (TL, lensattr, TL, ...) so a
busy machine slows both alike; the script asserts that the results agree (max abs diff <= 1e-4).
Peak memory is measured per side in a fresh subprocess (see ``--worker`` and the README).

Run: ``python benchmarks/bench_head_patching.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # TL's patching loop draws a tqdm bar per call

import torch  # noqa: E402
from transformer_lens import patching  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import lensattr  # noqa: E402
from lensattr import LogitDiff, PromptSet  # noqa: E402
from lensattr.evidence import Engine  # noqa: E402
from lensattr.evidence.interventions import ablate  # noqa: E402
from lensattr.models.loading import boot_bridge  # noqa: E402
from lensattr.models.zoo.word_vocab import word_tokenizer as _words  # noqa: E402

# Configuration of DESIGN.md, "Where the time goes".
N_LAYERS, N_HEADS, D_MODEL, D_VOCAB = 4, 8, 256, 30_522
N_PROMPTS, N_POS = 8, 24
CORRUPTED_POSITIONS = (5, 11, 17)  # positions whose token differs between clean and corrupted
TOLERANCE = 1e-4


# ---- set-up ------------------------------------------------------------------------------
def word_tokenizer(n_vocab: int):
    """In-memory tokenizer (``<bos>`` = 0, ``w1`` ... ``w{n-1}``); the benchmark feeds token
    ids directly, the tokenizer only lets the bridge boot offline."""
    return _words(["<bos>"] + [f"w{i}" for i in range(1, n_vocab)], "bench-words")


def build_model(seed: int = 0):
    """GPT-2-style bridge, 4 layers x 8 heads, d_model 256, vocabulary 30,522, random weights."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=D_VOCAB,
        n_positions=64,
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=N_HEADS,
        bos_token_id=0,
        eos_token_id=0,
    )
    return boot_bridge(GPT2LMHeadModel(cfg), word_tokenizer(D_VOCAB), "bench-gpt2-4x8")


def build_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """8 prompts x 24 random token ids (BOS = 0 first); corrupted differs at 3 positions."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, D_VOCAB, (N_PROMPTS, N_POS), generator=g)  # [batch, pos]
    clean[:, 0] = 0
    corrupted = clean.clone()
    pos = list(CORRUPTED_POSITIONS)
    corrupted[:, pos] = torch.randint(1, D_VOCAB, (N_PROMPTS, len(pos)), generator=g)
    answers = torch.randint(1, D_VOCAB, (N_PROMPTS,), generator=g)  # [batch]
    wrong = torch.randint(1, D_VOCAB, (N_PROMPTS,), generator=g)  # [batch]
    return {"clean": clean, "corrupted": corrupted, "answers": answers, "wrong": wrong}


# ---- the two sides -------------------------------------------------------------------------
def tl_metric(inputs) -> Callable[[torch.Tensor], torch.Tensor]:
    rows = torch.arange(N_PROMPTS)
    ans, wrong = inputs["answers"], inputs["wrong"]

    def mean_logit_diff(logits: torch.Tensor) -> torch.Tensor:  # [batch, pos, d_vocab]
        last = logits[:, -1]  # [batch, d_vocab]; every prompt is full length
        return (last[rows, ans] - last[rows, wrong]).mean()

    return mean_logit_diff


def run_tl(model, inputs) -> torch.Tensor:
    """TL: clean cache + one patched forward per head. Returns [layer, head]."""
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(inputs["clean"])
        out = patching.get_act_patch_attn_head_out_all_pos(
            model, inputs["corrupted"], clean_cache, tl_metric(inputs)
        )
    return out.detach().float()


def run_tl_by_pos(model, inputs) -> torch.Tensor:
    """TL per-position head patching (768 cells). Returns [layer, pos, head]."""
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(inputs["clean"])
        out = patching.get_act_patch_attn_head_out_by_pos(
            model, inputs["corrupted"], clean_cache, tl_metric(inputs)
        )
    return out.detach().float()


def patch_prompts(inputs) -> PromptSet:
    """Corrupted run as the base, clean as the resample source: resample = patch clean in."""
    return PromptSet(
        tokens=inputs["corrupted"],
        corrupted=inputs["clean"],
        answers=inputs["answers"],
        wrong=inputs["wrong"],
    )


def run_lensattr(model, inputs, batch_size: int = 256) -> torch.Tensor:
    """lensattr: Engine (clean + corrupted reference runs) + batched resample ablations.
    Returns per-prompt values [head (layer-major), prompt]."""
    engine = Engine(
        model, patch_prompts(inputs), LogitDiff(), batch_size=batch_size, progress=False
    )
    heads = engine.adapter.heads()  # layer-major, like TL's [layer, head].flatten()
    return engine.run([ablate(h, method="resample") for h in heads]).values


def run_audit(model, inputs):
    prompts = PromptSet(
        tokens=inputs["clean"],
        corrupted=inputs["corrupted"],
        answers=inputs["answers"],
        wrong=inputs["wrong"],
    )
    return lensattr.audit(model, prompts, LogitDiff(), progress=False, n_boot=200)


# ---- measuring ---------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all its threads, user + system)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(fns: dict[str, Callable[[], object]], n_runs: int) -> dict[str, list]:
    """``n_runs`` rounds calling each function once per round (warm them up before).
    Returns name -> list of (wall, cpu) seconds."""
    times: dict[str, list] = {k: [] for k in fns}
    for _ in range(n_runs):
        for k, fn in fns.items():
            times[k].append(timed_cpu(fn))
    return times


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(side: str, batch_size: int) -> None:
    """Fresh process: build model and inputs, warm the bridge with one 1-prompt forward, then
    time one call and measure its peak RSS above the memory held before it."""
    model = build_model()
    inputs = build_inputs()
    with torch.no_grad():
        model(inputs["clean"][:1])  # first-forward costs, the same for every side
    fns = {
        "tl": lambda: run_tl(model, inputs),
        "lensattr": lambda: run_lensattr(model, inputs, batch_size),
        "audit": lambda: run_audit(model, inputs),
    }
    rss0 = _status_kb("VmRSS")
    exact = _reset_peak() and rss0 is not None
    base = rss0 if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = timed(fns[side])
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "side": side,
        "batch_size": batch_size,
        "seconds": seconds,
        "method": "VmHWM reset" if exact else "ru_maxrss",
        "rss_before_mb": base / 1024,
        "peak_mb": peak / 1024,
        "delta_mb": (peak - base) / 1024,
        "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("RESULT " + json.dumps(out))


def measure_memory(side: str, batch_size: int = 256) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side]
    cmd += ["--batch-size", str(batch_size), "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"memory worker {side!r} failed:\n{proc.stderr[-2000:]}")


# ---- main --------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per side (after 1 warm-up)")
    ap.add_argument("--batch-sizes", default="8,64,256", help="Engine batch_size variants")
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    ap.add_argument("--no-audit", action="store_true", help="skip timing lensattr.audit")
    ap.add_argument("--by-pos", action="store_true", help="also time TL by-pos once (slow)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--worker", choices=["tl", "lensattr", "audit"], help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.batch_size)
        return

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    t0 = time.perf_counter()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cpus and torch.get_num_threads() > 1:
        print(
            f"WARNING: busy machine (load {load:.1f} on {cpus} cpus): multi-threaded torch can "
            "stall 10-30x when its threads are descheduled; trust the min column or rerun with "
            "--threads 1"
        )
    model = build_model()
    inputs = build_inputs()
    print(
        f"model: {N_LAYERS} layers x {N_HEADS} heads, d_model {D_MODEL}, vocab {D_VOCAB} "
        f"(random GPT-2); prompts: {N_PROMPTS} x {N_POS} tokens"
    )

    # ---- correctness: same numbers on both sides ---------------------------------------
    tl = run_tl(model, inputs).flatten()  # [layer * head]
    per_prompt = run_lensattr(model, inputs, batch_sizes[-1])  # [head, prompt]
    assert per_prompt.shape == (N_LAYERS * N_HEADS, N_PROMPTS), per_prompt.shape
    diffs = {}
    for bs in batch_sizes:
        values = per_prompt if bs == batch_sizes[-1] else run_lensattr(model, inputs, bs)
        diffs[bs] = (values.mean(1) - tl).abs().max().item()
    max_diff = max(diffs.values())
    print(
        f"\nagreement: max |mean_prompts(lensattr) - TL| over {tl.numel()} heads = {max_diff:.2e}"
        f" (per batch_size: {', '.join(f'{b}: {d:.1e}' for b, d in diffs.items())}); "
        f"metric range {tl.min():.4f} .. {tl.max():.4f}"
    )
    assert max_diff <= TOLERANCE, f"lensattr and TL disagree: max abs diff {max_diff:.3e}"

    # ---- time --------------------------------------------------------------------------
    fns: dict[str, Callable[[], object]] = {"tl": lambda: run_tl(model, inputs)}
    for bs in batch_sizes:
        fns[f"lensattr bs={bs}"] = lambda bs=bs: run_lensattr(model, inputs, bs)
    times = interleaved(fns, args.runs)  # the agreement check above was each one's warm-up
    wall = {k: [w for w, _ in v] for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in wall.items()}
    best = {k: min(v) for k, v in wall.items()}
    print(f"\nall-pos head patching, 32 cells; {args.runs} runs after 1 warm-up, interleaved")
    print("(each includes its reference runs: TL run_with_cache, lensattr Engine init)")
    head = f"{'median':>8} {'min':>8} {'max':>8} {'CPU med':>8}"
    print(f"  {'':<16} {head}  TL/lensattr: median (min)")
    for k in times:
        ratio = "" if k == "tl" else f"{med['tl'] / med[k]:5.1f}x ({best['tl'] / best[k]:.1f}x)"
        print(
            f"  {k:<16} {med[k]:7.3f}s {best[k]:7.3f}s {max(wall[k]):7.3f}s {cpu[k]:7.3f}s  {ratio}"
        )

    if args.by_pos:
        t_by_pos = timed(lambda: run_tl_by_pos(model, inputs))
        print(f"\nTL get_act_patch_attn_head_out_by_pos (768 cells), one run: {t_by_pos:.3f} s")
    if args.no_memory and not args.no_audit:
        t_audit = timed(lambda: run_audit(model, inputs))
        print(f"\nlensattr.audit (full pipeline, n_boot=200), one run: {t_audit:.3f} s")

    # ---- memory ------------------------------------------------------------------------
    if not args.no_memory:
        print("\npeak RSS of one call above the RSS before it, each in a fresh subprocess")
        print("(model built, one 1-prompt warm-up forward; the call includes its reference runs)")
        jobs = [("tl", 0)] + [("lensattr", bs) for bs in batch_sizes]
        if not args.no_audit:
            jobs.append(("audit", 256))
        for side, bs in jobs:
            m = measure_memory(side, bs or 256)
            name = f"lensattr bs={bs}" if side == "lensattr" else side
            took = f"; this one run took {m['seconds']:.1f} s" if side == "audit" else ""
            print(
                f"  {name:<16} +{m['delta_mb']:7.1f} MB over {m['rss_before_mb']:.0f} MB "
                f"(process max RSS {m['process_max_rss_mb']:.0f} MB, {m['method']}){took}"
            )
        if not args.no_audit:
            print("  audit = lensattr.audit(model, PromptSet(clean, corrupted), n_boot=200)")
    print(f"\nload average now {os.getloadavg()[0]:.2f}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
