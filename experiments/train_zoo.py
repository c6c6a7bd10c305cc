"""Train lensattr's small character-level zoo models offline, reproducibly, on one CPU thread.

Data: the top-level ``*.py`` files of this Python's standard library
(``sysconfig.get_paths()["stdlib"]``), sorted by name; every 10th file (index % 10 == 9) is
held out for evaluation, the rest are joined with "\\n" into the training text. The file
names, character counts and SHA-256 of both texts are recorded in ``recipe.json``.

Tokenizer: one token per character. Vocabulary = ``<bos>`` (id 0, also EOS and PAD),
``<unk>`` (id 1), then the 96 most frequent characters of the training text that are printable
or "\\n" / "\\t" (ranked by count, then code point; ids in code-point order); a ``tokenizers``
WordLevel model with a split-every-character pre-tokenizer, wrapped in ``PreTrainedTokenizerFast``.

Models (``GPT2LMHeadModel``, n_positions 128, dropout 0, eager attention):

* ``attn2``: 2 layers, attention only (d_model 128, 4 heads). HF has no attention-only GPT-2,
  so the MLP weights and biases are zeroed and frozen (and the unused ``ln_2`` frozen); they
  are exactly zero in the shipped weights.
* ``gpt3l``: 3 layers with MLPs (d_model 128, 4 heads, d_mlp 512).

Training: AdamW (lr 5e-3, betas 0.9/0.95, weight decay 0.01 on matrices, gradient clip 1.0),
batch 16 x 128 tokens; learning rate: 100 warm-up steps, constant, then linear decay to 10 % over
the last 25 % of the steps. Each row is BOS + 127 tokens: half of the rows (the last 8) are 127
characters from a uniformly random offset of the training text; the other half (``--rep-frac``
0.5, the first 8 rows) are a random token sequence (period uniform in 10..40, tokens uniform over
the non-special ids) repeated to fill the row.
Without these rows no induction head formed within 2000 steps (pure stdlib text: best induction
score 0.01); with them the induction phase change comes at about step 1500-1600 (attn2) and
1100-1200 (gpt3l), after which the previous-token head sharpens too. All randomness
comes from ``torch.manual_seed(seed)`` (initialisation) and one ``torch.Generator`` (data).
Every ``--log-every`` steps the script prints the mean training loss, the held-out loss and the
best induction and previous-token scores (a loss curve, also saved in ``facts.json``). At the
end it writes ``config.json``, ``model.safetensors`` (fp32), the tokenizer files,
``recipe.json`` and ``facts.json`` (from :func:`lensattr.evidence.facts.measure_facts` on the
booted ``TransformerBridge``) to ``lensattr/models/zoo/weights/<name>/``.

    python experiments/train_zoo.py                   # both models, as shipped
    python experiments/train_zoo.py --model attn2 --steps 300 --out /tmp/zoo   # quick check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing lensattr
    sys.path.insert(0, str(ROOT))
N_CHARS = 96
CTX = 128
ARCHS = {
    "attn2": dict(
        n_layer=2,
        attn_only=True,
        steps=3000,
        rep_frac=0.5,
        description="2-layer attention-only character-level GPT-2 trained on Python stdlib "
        "source; has a previous-token head in layer 0 and induction heads in layer 1",
    ),
    "gpt3l": dict(
        n_layer=3,
        attn_only=False,
        steps=2000,
        rep_frac=0.5,
        description="3-layer character-level GPT-2 with MLPs trained on Python stdlib source; "
        "has previous-token and induction heads",
    ),
}


def _versions() -> dict:
    import platform

    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def data_recipe() -> tuple[dict, str, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p.name for p in root.glob("*.py"))
    texts = {f: (root / f).read_text(encoding="utf-8", errors="replace") for f in files}
    held = [f for i, f in enumerate(files) if i % 10 == 9]
    train = [f for f in files if f not in held]
    train_text = "\n".join(texts[f] for f in train)
    held_text = "\n".join(texts[f] for f in held)
    recipe = {
        "stdlib": str(root),
        "versions": _versions(),
        "split": "top-level *.py sorted by name; held out: index % 10 == 9; joined with \\n",
        "train_files": {f: len(texts[f]) for f in train},
        "heldout_files": held,
        "heldout_chars": {f: len(texts[f]) for f in held},
        "train_chars": len(train_text),
        "heldout_total_chars": len(held_text),
        "train_sha256": hashlib.sha256(train_text.encode()).hexdigest(),
        "heldout_sha256": hashlib.sha256(held_text.encode()).hexdigest(),
    }
    return recipe, train_text, held_text


def build_tokenizer(train_text: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = Counter(c for c in train_text if c.isprintable() or c in "\n\t")
    chars = sorted(counts, key=lambda c: (-counts[c], ord(c)))[:N_CHARS]
    vocab = {"<bos>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(sorted(chars))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<bos>",
        unk_token="<unk>",
        model_max_length=CTX,
    )
    ids = tok("ab c")["input_ids"]
    assert len(ids) == 4 and tok.decode(ids) == "ab c", (ids, tok.decode(ids))
    return tok


def encode(tok, text: str) -> torch.Tensor:
    stoi, unk = tok.get_vocab(), tok.unk_token_id
    ids = torch.tensor([stoi.get(c, unk) for c in text])
    sample = text[:5000]
    want = [i for k in range(0, 5000, 100) for i in tok(sample[k : k + 100])["input_ids"]]
    assert ids[:5000].tolist() == want, "fast path != tokenizer"
    return ids


def make_model(tok, n_layer: int, attn_only: bool, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=CTX,
        n_embd=128,
        n_layer=n_layer,
        n_head=4,
        n_inner=512,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    if attn_only:  # no attention-only GPT-2 in HF: zero and freeze the MLPs (and unused ln_2)
        for block in model.transformer.h:
            for p in block.mlp.parameters():
                p.data.zero_()
                p.requires_grad_(False)
            for p in block.ln_2.parameters():
                p.requires_grad_(False)
            block.mlp.forward = _zero_mlp  # exact (the zero MLP outputs zeros), ~30 % faster
    return model


def _zero_mlp(h: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(h)


def batch(ids: torch.Tensor, bsz: int, gen: torch.Generator, rep_frac: float, vocab: int):
    starts = torch.randint(len(ids) - CTX, (bsz,), generator=gen)
    rows = torch.stack([ids[s : s + CTX - 1] for s in starts.tolist()])
    n_rep = round(rep_frac * bsz)
    for r in range(n_rep):  # repeated random sequences, period 10..40
        period = int(torch.randint(10, 41, (1,), generator=gen))
        seq = torch.randint(2, vocab, (period,), generator=gen)
        rows[r] = seq.repeat(CTX // period + 1)[: CTX - 1]
    return torch.cat([torch.zeros(bsz, 1, dtype=rows.dtype), rows], dim=1)


@torch.no_grad()
def monitor(model, tok, held: torch.Tensor, rep: torch.Tensor) -> tuple[float, float]:
    """Held-out loss, best induction and previous-token scores (HF attentions) on ``rep``."""
    model.eval()
    loss = model(held, attention_mask=torch.ones_like(held), labels=held).loss.item()
    out = model(rep, attention_mask=torch.ones_like(rep), output_attentions=True)
    att = out.attentions  # per layer [batch, head_index, query_pos, key_pos]
    T = (rep.shape[1] - 1) // 2
    q = torch.arange(T + 1, 2 * T + 1)
    best = max(a[:, :, q, q - T + 1].mean((0, 2)).max().item() for a in att)
    qp = torch.arange(1, 2 * T + 1)
    prev = max(a[:, :, qp, qp - 1].mean((0, 2)).max().item() for a in att)
    model.train()
    return loss, best, prev


def train(name: str, args, recipe: dict, train_text: str, held_text: str) -> None:
    from lensattr.evidence.facts import measure_facts
    from lensattr.models.loading import boot_bridge
    from lensattr.models.zoo.trained import load, repeated_tokens, text_windows

    spec = ARCHS[name]
    steps = args.steps or spec["steps"]
    rep_frac = spec["rep_frac"] if args.rep_frac is None else args.rep_frac
    tok = build_tokenizer(train_text)
    ids = encode(tok, train_text)
    model = make_model(tok, spec["n_layer"], spec["attn_only"], args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    warm, decay = min(100, steps // 10), steps - steps // 4

    def lr_at(step: int) -> float:  # warm-up, constant, linear decay to 10 % over the last 25 %
        if step < warm:
            return (step + 1) / warm
        return 1.0 - 0.9 * max(0, step - decay) / max(1, steps - decay)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    held = text_windows(tok, held_text, n=128)
    rep = repeated_tokens(tok, n_seq=16, seed=1)
    curve, run, t0 = [], [], time.time()
    print(f"[{name}] {sum(p.numel() for p in model.parameters())} params, {steps} steps")
    for step in range(1, steps + 1):
        x = batch(ids, args.batch, gen, rep_frac, len(tok))
        loss = model(x, attention_mask=torch.ones_like(x), labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        run.append(loss.item())
        if step % args.log_every == 0 or step == steps:
            hl, ind, prev = monitor(model, tok, held, rep)
            row = {"step": step, "train": sum(run) / len(run), "heldout": hl}
            row |= {"induction": ind, "prev_token": prev}
            curve.append(row | {"seconds": round(time.time() - t0, 1)})
            run = []
            print(
                f"[{name}] step {step:5d}  train {row['train']:.4f}  heldout {hl:.4f}  "
                f"induction {ind:.3f}  prev-token {prev:.3f}  {time.time() - t0:6.1f}s",
                flush=True,
            )
    if spec["attn_only"]:
        for block in model.transformer.h:
            del block.mlp.forward  # back to the real (zero) MLP
            assert all(float(p.abs().max()) == 0.0 for p in block.mlp.parameters())
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    arch = f"{spec['n_layer']}L x 4 heads, d_model 128, " + (
        "attention-only" if spec["attn_only"] else "d_mlp 512"
    )
    hp = {"steps": steps, "batch": args.batch, "lr": args.lr, "seed": args.seed}
    hp |= {"rep_frac": rep_frac, "rep_period": [10, 40], "ctx": CTX, "threads": 1}
    hp |= {"schedule": f"warm-up {warm}, constant, linear decay to 0.1 from step {decay}"}
    full = {"name": name, "description": spec["description"], "arch": arch} | hp | recipe
    (out / "recipe.json").write_text(json.dumps(full, indent=1) + "\n")
    hf, tok2 = load(out)  # measure the shipped files, exactly as users will load them
    n_params = sum(p.numel() for p in hf.parameters())  # before booting: the bridge adds some
    bridge = boot_bridge(hf, tok2, name)
    facts = measure_facts(bridge, tok2, held_text)
    facts["n_params"] = n_params
    facts["final_train_loss"] = curve[-1]["train"]
    facts["final_heldout_loss_128win"] = curve[-1]["heldout"]
    facts["train_seconds"] = round(time.time() - t0, 1)
    facts["loss_curve"] = curve
    (out / "facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    print(f"[{name}] facts: " + json.dumps({k: v for k, v in facts.items() if k != "loss_curve"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=[*ARCHS, "all"], default="all")
    ap.add_argument("--steps", type=int, default=0, help="0: the shipped number of steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rep-frac", type=float, default=None, help="default: the model's (0.5)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "lensattr" / "models" / "zoo" / "weights"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    recipe, train_text, held_text = data_recipe()
    for name in ARCHS if args.model == "all" else [args.model]:
        train(name, args, recipe, train_text, held_text)


if __name__ == "__main__":
    main()
