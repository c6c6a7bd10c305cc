"""Tasks for the character-level models trained on the Python standard library (``attn2``,
``gpt3l``): prompts built from the model's own tokenizer and from held-out stdlib text.

Every task gives clean and corrupted prompts of one length (so positions are roles), and names
the roles its mechanism is about.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

from ...core.prompts import PromptError, PromptSet, vocab_fingerprint
from .trained import WEIGHTS, heldout_text

__all__ = ["induction_prompts", "duplicate_prompts", "previous_token_prompts",
           "natural_text_prompts", "heldout"]


def _allowed(tokenizer, need: int = 2) -> torch.Tensor:
    """Ids of ordinary characters (no specials, no whitespace); at least ``need`` of them."""
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    ids = sorted(i for t, i in vocab.items()
                 if i not in special and len(t) == 1 and not t.isspace())
    if len(ids) < need:
        raise PromptError(
            f"tokenizer: these character tasks need {need} single-character tokens, the "
            f"tokenizer {_name(tokenizer)!r} has {len(ids)}; use a character-level model "
            "(attn2, gpt3l)"
        )
    return torch.tensor(ids)


def _name(tokenizer) -> str:
    return str(vocab_fingerprint(tokenizer).name or type(tokenizer).__name__)


def _distinct(allowed: torch.Tensor, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[n, k] rows of k distinct tokens from ``allowed``."""
    return torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(n)])


def induction_prompts(tokenizer, n: int, seed: int, half: int = 20,
                      vocab_name: str | None = None) -> PromptSet:
    """BOS + R + R[:k] (R: ``half`` distinct random tokens, k = half // 2); the answer at END is
    R[k], the wrong answer a token not in R. Corrupted: the first copy of R replaced by other
    random tokens, so nothing earlier says what comes next. Roles: PREV = the earlier copy of
    the END token, NEXT = the token after it (where an induction head should look)."""
    g = torch.Generator().manual_seed(seed)
    allowed, k = _allowed(tokenizer, 2 * half + 1), half // 2
    rows = _distinct(allowed, n, 2 * half + 1, g)  # R, a disjoint R2, one spare token
    R, R2, wrong = rows[:, :half], rows[:, half : 2 * half], rows[:, 2 * half]
    bos = torch.full((n, 1), tokenizer.bos_token_id)
    clean = torch.cat([bos, R, R[:, :k]], 1)  # [n, 1 + half + k]
    corrupted = torch.cat([bos, R2, R[:, :k]], 1)
    return PromptSet(tokens=clean, corrupted=corrupted, answers=R[:, k], wrong=wrong,
                     roles={"BOS": 0, "PREV": k, "NEXT": k + 1}, name="induction",
                     vocab=vocab_fingerprint(tokenizer, vocab_name))


def duplicate_prompts(tokenizer, n: int, seed: int, length: int = 24, dup: int = 8,
                      vocab_name: str | None = None) -> PromptSet:
    """BOS + distinct random tokens whose last one (END) repeats the token at DUP; answer =
    the token after DUP (NEXT), wrong = a token not in the prompt. Corrupted: the token at DUP
    replaced by an unused token, so END has no earlier duplicate."""
    g = torch.Generator().manual_seed(seed)
    rows = _distinct(_allowed(tokenizer, length + 1), n, length + 1, g)
    body, spare = rows[:, : length - 1], rows[:, length]
    wrong = rows[:, length - 1]
    clean = torch.cat([torch.full((n, 1), tokenizer.bos_token_id), body, body[:, dup - 1 : dup]], 1)
    corrupted = clean.clone()
    corrupted[:, dup] = spare
    return PromptSet(tokens=clean, corrupted=corrupted, answers=clean[:, dup + 1], wrong=wrong,
                     roles={"BOS": 0, "DUP": dup, "NEXT": dup + 1}, name="duplicate-token",
                     vocab=vocab_fingerprint(tokenizer, vocab_name))


def heldout(model_name: str = "attn2") -> str:
    """The held-out stdlib text of a trained model's recipe (this Python's copy of the files)."""
    recipe = json.loads((WEIGHTS / model_name / "recipe.json").read_text())
    text = heldout_text(recipe)
    if text is None:  # another Python: same file names, other content
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [root / f for f in recipe["heldout_files"] if (root / f).exists()]
        text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return text


def _windows(tokenizer, text: str, n: int, length: int, seed: int, need_repeat: bool):
    """``n`` windows of ``length`` characters (offsets drawn with ``seed``); with
    ``need_repeat`` only windows whose next character follows an earlier copy of the last
    character somewhere in the window (so in-context copying can help)."""
    g = torch.Generator().manual_seed(seed)
    vocab = tokenizer.get_vocab()
    out = []
    for start in torch.randint(0, len(text) - length - 1, (50 * n,), generator=g).tolist():
        w = text[start : start + length + 1]
        if any(c not in vocab or c.isspace() for c in w[-2:]):
            continue
        if need_repeat and w[-2:] not in w[:-2]:
            continue
        out.append(w)
        if len(out) == n:
            return out
    raise ValueError(f"n: could not find {n} suitable windows in the held-out text")


def previous_token_prompts(tokenizer, n: int, seed: int, length: int = 24,
                           vocab_name: str | None = None) -> PromptSet:
    """Held-out stdlib windows; the answer is the true next character. Corrupted: the
    character before END (role PREV) replaced by another one. Metric: answer log-prob."""
    wins = _windows(tokenizer, heldout(), n, length, seed, need_repeat=False)
    ids = torch.tensor([tokenizer(w)["input_ids"] for w in wins])  # [n, length + 1]
    bos = torch.full((n, 1), tokenizer.bos_token_id)
    clean = torch.cat([bos, ids[:, :-1]], 1)
    corrupted = clean.clone()
    allowed = _allowed(tokenizer)
    g = torch.Generator().manual_seed(seed + 1)
    swap = allowed[torch.randint(len(allowed), (n,), generator=g)]
    swap = torch.where(swap == clean[:, -2], allowed[0], swap)  # always a different character
    corrupted[:, -2] = swap
    return PromptSet(tokens=clean, corrupted=corrupted, answers=ids[:, -1],
                     roles={"BOS": 0, "PREV": length - 1}, text=tuple(w[:-1] for w in wins),
                     name="previous-token", vocab=vocab_fingerprint(tokenizer, vocab_name))


def natural_text_prompts(tokenizer, n: int, seed: int, length: int = 48,
                         vocab_name: str | None = None) -> PromptSet:
    """Held-out stdlib windows whose next character continues an earlier bigram in the window;
    answer = the true next character. Corrupted: the first half replaced by the first half of
    another window. Metric: answer log-prob."""
    text = heldout()
    wins = _windows(tokenizer, text, n, length, seed, need_repeat=True)
    others = _windows(tokenizer, text, n, length, seed + 1000, need_repeat=False)
    ids = torch.tensor([tokenizer(w)["input_ids"] for w in wins])
    oth = torch.tensor([tokenizer(w)["input_ids"] for w in others])
    bos = torch.full((n, 1), tokenizer.bos_token_id)
    clean = torch.cat([bos, ids[:, :-1]], 1)
    corrupted = clean.clone()
    corrupted[:, 1 : length // 2] = oth[:, : length // 2 - 1]
    return PromptSet(tokens=clean, corrupted=corrupted, answers=ids[:, -1], roles={"BOS": 0},
                     text=tuple(w[:-1] for w in wins), name="natural-text",
                     vocab=vocab_fingerprint(tokenizer, vocab_name))
