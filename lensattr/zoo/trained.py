"""Small character-level GPT-2 models trained here on the Python standard library's source.

Each folder of ``weights/`` that holds a ``facts.json`` is registered as a bundled model:
``config.json`` + ``model.safetensors`` (loaded with ``use_safetensors=True``, never unpickled),
the tokenizer files, ``recipe.json`` (how ``experiments/train_zoo.py`` made it) and
``facts.json`` (what :func:`measure_facts` found in it: induction and previous-token heads).
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

from ..evidence import Engine, ablate
from ..loading import ModelInfo, register_model
from ..metrics import LogitsMetric
from ..model import Adapter, Site
from ..prompts import PromptSet
from ..types import HeadId, Int

__all__ = ["WEIGHTS", "load", "repeated_tokens", "text_windows", "heldout_text", "measure_facts"]

WEIGHTS = Path(__file__).parent / "weights"


def load(folder: Path | str):
    """(hf_model, tokenizer) from a trained folder: safetensors only, eager attention, eval."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = Path(folder)
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    tok.init_kwargs["name_or_path"] = folder.name  # see DESIGN.md: avoids the hub fall-back
    tok.init_kwargs["add_bos_token"] = True
    model = GPT2LMHeadModel.from_pretrained(
        str(folder), use_safetensors=True, attn_implementation="eager"
    )
    return model.eval(), tok


def repeated_tokens(
    tokenizer, n_seq: int = 32, half: int = 40, seed: int = 0
) -> Int[Tensor, "batch pos"]:
    """[n_seq, 1 + 2*half]: BOS, then ``half`` random non-special tokens, repeated once."""
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    rand = allowed[torch.randint(len(allowed), (n_seq, half), generator=gen)]
    bos = torch.full((n_seq, 1), tokenizer.bos_token_id)
    return torch.cat([bos, rand, rand], dim=1)


def heldout_text(recipe: dict) -> str | None:
    """The held-out stdlib text named by a recipe, or None when this Python's stdlib differs."""
    root = Path(sysconfig.get_paths()["stdlib"])
    try:
        text = "\n".join(_read(root / f) for f in recipe["heldout_files"])
    except OSError:
        return None
    ok = hashlib.sha256(text.encode()).hexdigest() == recipe["heldout_sha256"]
    return text if ok else None


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def text_windows(tokenizer, text: str, n: int = 64, length: int = 127) -> Int[Tensor, "batch pos"]:
    """[n, 1 + length]: BOS + ``length`` characters at ``n`` evenly spaced offsets of ``text``."""
    starts = torch.linspace(0, len(text) - length, n).long().tolist()
    ids = tokenizer([text[s : s + length] for s in starts])["input_ids"]
    assert all(len(x) == length for x in ids), "tokenizer is not one token per character"
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), torch.tensor(ids)], dim=1)


def _nll(logits: Tensor, tokens: Tensor) -> Tensor:
    """[batch, pos-1]: negative log-likelihood of tokens[:, 1:] from logits[:, :-1]."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None])[..., 0]


def measure_facts(bridge, tokenizer, heldout: str | None = None, half: int = 40) -> dict:
    """Induction / previous-token scores per head, in-context losses and a head ablation.

    On 32 sequences BOS + R + R (R = ``half`` random tokens, seed 0), with positions 0..2T:

    * ``induction_score[L][h]``: mean attention from query i in T+1..2T to key i-T+1 (the
      token after the previous occurrence of token i);
    * ``prev_token_score[L][h]``: mean attention from query i in 1..2T to key i-1;
    * ``loss_first_half``: mean NLL of the tokens at 1..T; ``loss_second_half``: of the
      tokens at T+2..2T (the ones induction can predict);
    * ``ablate_top_induction``: second-half loss with that head zero-ablated (lensattr's zero
      ablation: ``hook_z`` set to the value bias b_V; likewise for the top previous-token
      head); ``ablate_all_induction``: with every head of induction score > 0.3 zero-ablated
      at once; ``heldout_loss``: on 64 held-out stdlib windows.
    """
    ad = Adapter(bridge)
    T = half
    toks = repeated_tokens(tokenizer, half=half)
    logits, cache = ad.run_with_cache(toks, sites=(Site.PATTERN,))
    q = torch.arange(T + 1, 2 * T + 1)
    qp = torch.arange(1, 2 * T + 1)
    ind, prev = [], []
    for layer in range(ad.n_layers):
        pat = cache[(Site.PATTERN, layer)].float()  # [batch, head_index, query_pos, key_pos]
        ind.append(pat[:, :, q, q - T + 1].mean((0, 2)).tolist())
        prev.append(pat[:, :, qp, qp - 1].mean((0, 2)).tolist())

    def halves(lg: Tensor) -> tuple[float, float]:
        nll = _nll(lg, toks)  # nll[:, j] is the loss of the token at position j + 1
        return nll[:, :T].mean().item(), nll[:, T + 1 :].mean().item()

    first, second = halves(logits)
    facts = {
        "n_layers": ad.n_layers,
        "n_heads": ad.n_heads,
        "induction_score": ind,
        "prev_token_score": prev,
        "loss_first_half": first,
        "loss_second_half": second,
    }

    def second_half(logits: Tensor, prompts) -> Tensor:  # [batch] mean NLL of T+2..2T
        return _nll(logits, prompts.tokens)[:, T + 1 :].mean(1)

    engine = Engine(ad, PromptSet(tokens=toks), LogitsMetric(second_half), progress=False)

    def ablated(heads: list[HeadId]) -> dict:
        loss = engine.run([ablate(*heads)]).values[0].mean().item()
        return {
            "heads": [list(hd) for hd in heads],
            "loss_second_half": loss,
            "increase": loss - second,
        }

    for kind, scores in (("induction", ind), ("prev_token", prev)):
        top = max(ad.heads(), key=lambda hd: scores[hd[0]][hd[1]])
        facts[f"top_{kind}_head"] = list(top)
        facts[f"top_{kind}_score"] = scores[top[0]][top[1]]
        facts[f"ablate_top_{kind}"] = ablated([top])
    facts["ablate_all_induction"] = ablated([hd for hd in ad.heads() if ind[hd[0]][hd[1]] > 0.3])
    if heldout is not None:
        win = text_windows(tokenizer, heldout)
        facts["heldout_loss"] = _nll(ad.forward(win), win).mean().item()
    return facts


def _contains(facts: dict) -> str:
    def heads(scores: list[list[float]], floor: float) -> str:
        found = [(s, layer, h) for layer, row in enumerate(scores) for h, s in enumerate(row)]
        found = sorted((x for x in found if x[0] > floor), reverse=True)
        return ", ".join(f"L{layer}H{h} (score {s:.2f})" for s, layer, h in found) or "none"

    top, every = facts["ablate_top_induction"], facts["ablate_all_induction"]
    return (
        f"induction heads {heads(facts['induction_score'], 0.3)}; "
        f"previous-token heads {heads(facts['prev_token_score'], 0.5)}; "
        f"repeated-half loss {facts['loss_second_half']:.2f} vs first half "
        f"{facts['loss_first_half']:.2f} nats; zeroing the top induction head raises it by "
        f"{top['increase']:.2f}, zeroing all {len(every['heads'])} by {every['increase']:.2f}"
    )


def _register(folder: Path) -> None:
    facts = json.loads((folder / "facts.json").read_text())
    recipe = json.loads((folder / "recipe.json").read_text())
    n_params = facts["n_params"]
    register_model(
        ModelInfo(
            name=folder.name,
            description=recipe["description"],
            size=f"{n_params / 1e3:.0f}k params ({recipe['arch']})",
            recipe=f"experiments/train_zoo.py --model {folder.name} "
            f"({recipe['steps']} steps, stdlib source, seed {recipe['seed']})",
            contains=_contains(facts),
            builder=lambda: load(folder),
        )
    )


for _folder in sorted(WEIGHTS.glob("*/facts.json")):
    _register(_folder.parent)
