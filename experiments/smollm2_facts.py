"""Measure SmolLM2-135M-Instruct's facts with PLAIN TransformerLens hooks and write
``lensattr/models/zoo/data/smollm2_facts.json``.

Independent of lensattr's engine on purpose: only the prompts come from lensattr
(``lensattr.tasks_text``); every number is read from ``model(tokens)``,
``model.run_with_cache`` and ``model.run_with_hooks`` with TransformerLens hook names, so the
tests that re-measure these facts check lensattr's task and loader code against TL itself.

* ``tasks[name]``: clean and corrupted logit difference (answer - wrong at END), accuracy
  (share > 0), top-1 and gap, on the task's prompts (seed 0; ioi and repeat-tokens 32,
  capital-recall 23).
* ``ioi_resample_effect[L][h]``: the IOI logit difference with head h of layer L's ``hook_z``
  replaced (every position) by its value on the paired ABC-corrupted prompt, normalised:
  e = (mean m_abl - mean m0) / (mean m_c - mean m0) over the 32 prompts (0 = no change, 1 =
  as bad as the corrupted run). ``ioi_top_heads``: the 10 largest; ``ioi_bottom_heads``: the
  5 most negative (ablating them helps).
* ``induction_score`` / ``prev_token_score`` [L][h]: on 16 sequences BOS + R + R (R = 30
  distinct random word tokens, seed 0), positions 0..60: mean attention from query i in 31..60
  to key i - 29 (the token after the previous copy), and from query i in 1..60 to key i - 1.
  ``repeated``: mean next-token loss on the first copy (tokens 1..30) and on the second
  (tokens 32..60, which induction can predict). Top-10 lists of both scores.

    python experiments/smollm2_facts.py            # about 10 minutes on 1 CPU thread
    python experiments/smollm2_facts.py --out /tmp/facts.json --heads 12
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing lensattr
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "lensattr" / "models" / "zoo" / "data" / "smollm2_facts.json"
TASK_N = {"ioi": 32, "repeat-tokens": 32, "capital-recall": 23}
REPEAT_HALF, REPEAT_SEQ = 30, 16


def _logit_diff(model, prompts, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch] answer - wrong logit at END, [batch] top token at END) from a plain forward."""
    with torch.no_grad():
        logits = model(tokens)
    rows = torch.arange(len(prompts))
    end = logits[rows, prompts.roles["END"]].float()  # [batch, d_vocab]
    return end[rows, prompts.answers] - end[rows, prompts.wrong], end.argmax(-1)


def task_facts(model, name: str, n: int | None = None, seed: int = 0) -> dict:
    import lensattr

    p = lensattr.tasks.get(name).prompts(n or TASK_N[name], seed, model)
    clean, top = _logit_diff(model, p, p.tokens)
    corr, _ = _logit_diff(model, p, p.corrupted)
    return {"n_prompts": len(p), "seed": seed, "prompts_hash": p.hash(),
            "clean_mean": clean.mean().item(), "corrupted_mean": corr.mean().item(),
            "gap": (clean.mean() - corr.mean()).item(),
            "accuracy": (clean > 0).float().mean().item(),
            "top1": (top == p.answers).float().mean().item(),
            "clean_per_prompt": [round(x, 4) for x in clean.tolist()]}


def ioi_prompts(model, n: int = TASK_N["ioi"], seed: int = 0):
    import lensattr

    return lensattr.tasks.get("ioi").prompts(n, seed, model)


def resample_effects(model, prompts, heads: list[tuple[int, int]]) -> dict:
    """Per head: the normalised effect of replacing its hook_z by the corrupted run's."""
    m0, _ = _logit_diff(model, prompts, prompts.tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(prompts.corrupted,
                                        names_filter=lambda name: name.endswith("attn.hook_z"))
    rows = torch.arange(len(prompts))
    mc, _ = _logit_diff(model, prompts, prompts.corrupted)
    den = (mc.mean() - m0.mean()).item()
    out = {}
    for layer, head in heads:
        z_corr = cache[f"blocks.{layer}.attn.hook_z"]  # [batch, pos, head_index, d_head]

        def patch(z, hook, h=head, zc=z_corr):
            z = z.clone()
            z[:, :, h] = zc[:, :, h]
            return z

        with torch.no_grad():
            logits = model.run_with_hooks(prompts.tokens,
                                          fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)])
        end = logits[rows, prompts.roles["END"]].float()
        m = end[rows, prompts.answers] - end[rows, prompts.wrong]
        out[(layer, head)] = (m.mean().item() - m0.mean().item()) / den
    return out


def repeated_tokens(tokenizer, n_seq: int = REPEAT_SEQ, half: int = REPEAT_HALF, seed: int = 0
                    ) -> torch.Tensor:
    """[n_seq, 1 + 2 * half]: BOS + R + R, R = ``half`` distinct random word tokens."""
    from lensattr.tasks.text import word_tokens

    allowed = word_tokens(tokenizer)
    g = torch.Generator().manual_seed(seed)
    R = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:half]]
                     for _ in range(n_seq)])
    return torch.cat([torch.full((n_seq, 1), tokenizer.bos_token_id), R, R], 1)


def repeated_facts(model) -> dict:
    T = REPEAT_HALF
    toks = repeated_tokens(model.tokenizer)
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            toks, names_filter=lambda name: name.endswith("attn.hook_pattern"))
    q, qp = torch.arange(T + 1, 2 * T + 1), torch.arange(1, 2 * T + 1)
    ind, prev = [], []
    for layer in range(model.cfg.n_layers):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"].float()  # [batch, head, q, k]
        ind.append([round(x, 5) for x in pat[:, :, q, q - T + 1].mean((0, 2)).tolist()])
        prev.append([round(x, 5) for x in pat[:, :, qp, qp - 1].mean((0, 2)).tolist()])
    logp = logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, toks[:, 1:, None])[..., 0]  # nll[:, j]: token at j + 1
    return {"induction_score": ind, "prev_token_score": prev,
            "repeated": {"n_seq": REPEAT_SEQ, "half": T, "seed": 0,
                         "loss_first_half": nll[:, :T].mean().item(),
                         "loss_second_half": nll[:, T + 1:].mean().item()}}


def top(grid: list[list[float]], k: int, key: str = "score", reverse: bool = True) -> list:
    cells = [(v, layer, h) for layer, row in enumerate(grid) for h, v in enumerate(row)]
    cells.sort(key=lambda c: c[0], reverse=reverse)
    return [{"layer": layer, "head": h, key: round(v, 5)} for v, layer, h in cells[:k]]


def measure(model, heads_limit: int | None = None, progress: bool = True) -> dict:
    from lensattr.models.gguf import file_sha256
    from lensattr.models.zoo.smollm2 import GGUF_FILE, gguf_path

    t0 = time.time()
    L, H = model.cfg.n_layers, model.cfg.n_heads
    facts = {"model": "smollm2", "gguf_file": GGUF_FILE, "gguf_sha256": file_sha256(gguf_path()),
             "n_layers": L, "n_heads": H,
             "bos": model.tokenizer.bos_token,
             "measured_with": "plain TransformerLens hooks (model(tokens), run_with_cache, "
                              "run_with_hooks on hook_z / hook_pattern); not lensattr's engine"}
    facts["tasks"] = {name: task_facts(model, name) for name in TASK_N}
    facts.update(repeated_facts(model))
    facts["top_induction_heads"] = top(facts["induction_score"], 10)
    facts["top_prev_token_heads"] = top(facts["prev_token_score"], 10)
    heads = [(layer, h) for layer in range(L) for h in range(H)][:heads_limit]
    prompts = ioi_prompts(model)
    effects = {}
    for i in range(0, len(heads), H):
        effects.update(resample_effects(model, prompts, heads[i:i + H]))
        if progress:
            print(f"  ioi resample ablation: {len(effects)}/{len(heads)} heads "
                  f"({time.time() - t0:.0f} s)", flush=True)
    grid = [[round(effects.get((layer, h), float("nan")), 5) for h in range(H)]
            for layer in range(L)]
    facts["ioi_resample_effect"] = grid
    facts["ioi_resample"] = {"n_prompts": len(prompts), "seed": 0,
                             "pairing": "each prompt with its own ABC-corrupted prompt",
                             "sites": "hook_z, every position"}
    finite = [[v if v == v else -1e9 for v in row] for row in grid]
    facts["ioi_top_heads"] = top(finite, 10, "effect")
    facts["ioi_bottom_heads"] = top([[v if v == v else 1e9 for v in row] for row in grid], 5,
                                    "effect", reverse=False)
    from importlib.metadata import version

    facts["versions"] = {d: version(d) for d in ("torch", "transformers", "transformer-lens")}
    facts["seconds"] = round(time.time() - t0, 1)
    return facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--heads", type=int, default=None, help="only the first N heads (a check)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import lensattr

    model = lensattr.load_model("smollm2")
    facts = measure(model, args.heads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(facts, indent=1) + "\n")
    print(f"wrote {args.out} in {facts['seconds']} s")
    for name, t in facts["tasks"].items():
        print(f"  {name}: clean {t['clean_mean']:.3f} corrupted {t['corrupted_mean']:.3f} "
              f"gap {t['gap']:.3f} accuracy {t['accuracy']:.3f} top1 {t['top1']:.3f}")
    print("  ioi top heads:", facts["ioi_top_heads"][:6])
    print("  induction:", facts["top_induction_heads"][:6])
    print("  prev-token:", facts["top_prev_token_heads"][:6])


if __name__ == "__main__":
    main()
