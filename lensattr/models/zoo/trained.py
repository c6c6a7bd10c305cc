"""Small character-level GPT-2 models trained here on the Python standard library's source.

Each folder of ``weights/`` that holds a ``facts.json`` is registered as a bundled model:
``config.json`` + ``model.safetensors`` (loaded with ``use_safetensors=True``, never unpickled),
the tokenizer files, ``recipe.json`` (how ``experiments/train_zoo.py`` made it) and
``facts.json`` (what :func:`lensattr.evidence.facts.measure_facts` found in it: induction and
previous-token heads).
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

from ...core.types import Int
from ..registry import ModelInfo, register_model

__all__ = ["WEIGHTS", "load", "repeated_tokens", "text_windows", "heldout_text"]

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
