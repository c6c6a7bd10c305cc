"""Prompts from strings: the logic of ``PromptSet.from_text`` (in :mod:`lensattr.core.prompts`),
returned as plain data (the PromptSet keyword arguments; this module does not import prompts).

Tokens are what ``TransformerBridge.to_tokens(texts, prepend_bos=..., padding_side=...)``
gives: each prompt is tokenised on its own without special tokens and the tokenizer's BOS id is
put in front when ``prepend_bos`` (default: the bridge's ``cfg.default_prepend_bos``; True for
a bare tokenizer); prompts of different lengths are padded to the longest with the pad id (eos,
then 0, when there is none) on ``padding_side`` (default the tokenizer's, else "right"), with an
``attention_mask`` only then. Corrupted prompts must have their clean prompt's token length and
are padded the same way.

``answers`` / ``wrong``: a string or token id for every prompt, or a list of them (one per
prompt); a string must be exactly one token (encoded without special tokens).

``roles``: name -> spec, found on the clean prompts; positions come out in padded coordinates.
A spec is a substring of each prompt (a ``str``), one substring per prompt (a list of ``str``),
``(substring_or_list, occurrence)`` (0 first, -1 last, k the k-th occurrence in the text), a
token position in the prompt's own tokens (BOS included; negative counts from the last real
token) or a list of them. A substring's role is the token holding its last character (the
fast tokenizer's offsets; a slow tokenizer's: the last token of the substring's ids found as a
run of the prompt's ids). ``BOS`` is added at each prompt's BOS (its first real token) when
one is prepended and the roles do not name it; ``END`` is left to PromptSet (last real token).

Refused (:class:`TextPromptError`, re-raised by ``from_text`` as ``PromptError``), naming the
argument: a model without a tokenizer; ``prepend_bos`` with no BOS token; ``padding_side``
other than "left" / "right"; no clean prompts or an empty one; as many ``corrupted`` /
``answers`` / ``wrong`` / per-prompt role entries as there are not prompts; ``corrupted[i]`` of
another token length than ``clean[i]`` (both token lists shown); ``answers[i]`` of more than
one token (its tokens shown, with the fix when ``" " + s`` is one token) or an id outside the
vocabulary; a role substring that is not in prompt ``i``, occurs more than once without an
occurrence (its positions shown), starts or ends inside a token (the tokens shown), or an
occurrence / position outside the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TextPromptError", "prompt_kwargs"]

_SIDES = ("left", "right")


class TextPromptError(ValueError):
    """Strings that do not make valid prompts; ``PromptSet.from_text`` raises it as a
    ``PromptError``."""


@dataclass(frozen=True)
class _Enc:
    """One prompt: its text, its token ids (BOS included), offsets of the text's tokens
    (``None`` for a slow tokenizer), ``start`` = 1 with BOS, and ``pad`` = padding in front."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]] | None
    start: int
    pad: int = 0


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 4] + " ..."


def _tokenizer(model) -> tuple[Any, bool]:
    """The tokenizer and the default of ``prepend_bos``: a bridge's (its
    ``cfg.default_prepend_bos``) or a tokenizer given directly (True)."""
    if hasattr(model, "tokenizer") and not callable(getattr(model, "convert_ids_to_tokens", None)):
        tok = model.tokenizer
        default = bool(getattr(getattr(model, "cfg", None), "default_prepend_bos", True))
    else:
        tok, default = model, True
    if tok is None or not callable(getattr(tok, "convert_ids_to_tokens", None)):
        raise TextPromptError(
            f"model: expected a TransformerBridge with a tokenizer or a Hugging Face tokenizer, "
            f"got {type(model).__name__}"
            + (" whose tokenizer is None" if tok is None and model is not None else "")
        )
    return tok, default


def _texts(x, arg: str, n: int | None = None) -> list[str]:
    texts = [x] if isinstance(x, str) else x
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TextPromptError(f"{arg}: expected a string or a sequence of strings, got "
                              f"{type(x).__name__}")
    if not texts:
        raise TextPromptError(f"{arg}: expected at least one prompt, got none")
    if n is not None and len(texts) != n:
        raise TextPromptError(f"{arg}: expected {n} strings (one per clean prompt), got "
                              f"{len(texts)}")
    return list(texts)


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _show(tok, ids) -> list[str]:
    return [tok.decode([i]) for i in ids]


def _encode(tok, texts: list[str], bos: int | None, arg: str) -> list[_Enc]:
    fast = bool(getattr(tok, "is_fast", False))
    out = []
    for i, t in enumerate(texts):
        if fast:
            e = tok(t, add_special_tokens=False, return_offsets_mapping=True)
            offsets = [(int(a), int(b)) for a, b in e["offset_mapping"]]
        else:
            e, offsets = tok(t, add_special_tokens=False), None
        ids = ([] if bos is None else [bos]) + list(e["input_ids"])
        if not ids:
            raise TextPromptError(f"{arg}[{i}]: {t!r} is no tokens (and no BOS is prepended)")
        out.append(_Enc(t, ids, offsets, 0 if bos is None else 1))
    return out


def _pad(encs: list[_Enc], side: str) -> list[_Enc]:
    n = max(len(e.ids) for e in encs)
    return [_Enc(e.text, e.ids, e.offsets, e.start, n - len(e.ids) if side == "left" else 0)
            for e in encs]


def _rows(encs: list[_Enc], pad_id: int, side: str) -> tuple[list[list[int]], list[list[int]]]:
    n = max(len(e.ids) for e in encs)
    tokens, mask = [], []
    for e in encs:
        fill = n - len(e.ids)
        if side == "left":
            tokens.append([pad_id] * fill + e.ids)
            mask.append([0] * fill + [1] * len(e.ids))
        else:
            tokens.append(e.ids + [pad_id] * fill)
            mask.append([1] * len(e.ids) + [0] * fill)
    return tokens, mask


def _check_corrupted(tok, clean: list[_Enc], corr: list[_Enc]) -> None:
    for i, (c, k) in enumerate(zip(clean, corr, strict=True)):
        if len(c.ids) != len(k.ids):
            raise TextPromptError(
                f"corrupted[{i}]: {_short(k.text)!r} is {len(k.ids)} tokens but its clean "
                f"prompt clean[{i}] {_short(c.text)!r} is {len(c.ids)}; a corrupted prompt must "
                "have as many tokens as its clean prompt so that positions (roles) line up. "
                f"clean: {_show(tok, c.ids)}; corrupted: {_show(tok, k.ids)}"
            )


def _answer_ids(tok, spec, n: int, arg: str) -> list[int] | None:
    """``[n]`` token ids from one string / id (for every prompt) or one per prompt."""
    if spec is None:
        return None
    if isinstance(spec, torch.Tensor):
        spec = spec.tolist()
    single = isinstance(spec, (str, int))
    items = [spec] * n if single else spec
    if not isinstance(items, Sequence):
        raise TextPromptError(f"{arg}: expected a string, a token id, or a list of them (one "
                              f"per prompt), got {type(spec).__name__}")
    if len(items) != n:
        raise TextPromptError(f"{arg}: expected one per prompt ({n}), got {len(items)}")
    what = "an answer" if arg == "answers" else "a wrong answer"
    out = []
    for i, s in enumerate(items):
        where = arg if single else f"{arg}[{i}]"
        if isinstance(s, bool) or not isinstance(s, (str, int)):
            raise TextPromptError(f"{where}: expected a string or an integer token id, got "
                                  f"{type(s).__name__}")
        if isinstance(s, int):
            if not 0 <= s < len(tok):
                raise TextPromptError(f"{where}: token id {s} is outside the tokenizer's "
                                      f"vocabulary 0..{len(tok) - 1}")
            out.append(s)
            continue
        ids = _ids(tok, s)
        if len(ids) != 1:
            msg = (f"{where}: {s!r} is {len(ids)} tokens {_show(tok, ids)}; {what} must be "
                   "one token")
            if s and not s.startswith(" ") and len(_ids(tok, " " + s)) == 1:
                msg += f". {' ' + s!r} (with its leading space) is one token"
            raise TextPromptError(msg)
        out.append(ids[0])
    return out


def _matches(tok, e: _Enc, s: str) -> list[tuple[int, str | None]]:
    """Every occurrence of ``s`` in the prompt: (position in the prompt's own tokens, BOS
    included; a problem or None). The position is the token holding the last character."""
    if e.offsets is None:  # slow tokenizer: the substring's ids as a run of the prompt's ids
        sub, ids = _ids(tok, s), e.ids[e.start:]
        return [(j + len(sub) - 1 + e.start, None) for j in range(len(ids) - len(sub) + 1)
                if sub and ids[j: j + len(sub)] == sub]
    out: list[tuple[int, str | None]] = []
    c = e.text.find(s)
    while c >= 0:
        end = c + len(s)
        spans = [(j, a, b) for j, (a, b) in enumerate(e.offsets) if b > a and a < end and b > c]
        if not spans:
            out.append((-1, "covers no token"))
        else:
            cut = [f"{w} inside the token {_show(tok, [e.ids[j + e.start]])[0]!r}"
                   for j, a, b in spans for w, x in (("starts", c), ("ends", end)) if a < x < b]
            problem = None if not cut else (
                " and ".join(dict.fromkeys(cut)) + "; the text there is the tokens "
                f"{_show(tok, [e.ids[j + e.start] for j, _, _ in spans])}. A role's substring must "
                "start and end at token boundaries")
            out.append((spans[-1][0] + e.start, problem))
        c = e.text.find(s, c + 1)
    return out


def _substring_pos(tok, name: str, e: _Enc, i: int, s: str, occ: int | None) -> int:
    arg = f"roles[{name!r}]"
    if not s:
        raise TextPromptError(f"{arg}: an empty substring marks no token")
    found = _matches(tok, e, s)
    if not found:
        how = "" if e.offsets is not None else f" (as the tokens {_show(tok, _ids(tok, s))})"
        raise TextPromptError(f"{arg}: {s!r}{how} is not in prompt {i} ({_short(e.text)!r})")
    if all(problem for _, problem in found):  # no occurrence on token boundaries
        raise TextPromptError(f"{arg}: {s!r} in prompt {i} {found[0][1]}")
    if occ is None and len(found) > 1:
        raise TextPromptError(
            f"{arg}: {s!r} occurs {len(found)} times in prompt {i} ({_short(e.text)!r}), at "
            f"token positions {[p for p, _ in found]}; pass ({s!r}, 0) for the first or "
            f"({s!r}, -1) for the last")
    k = 0 if occ is None else occ
    if not -len(found) <= k < len(found):
        raise TextPromptError(f"{arg}: occurrence {k} of {s!r} asked, but prompt {i} has "
                              f"{len(found)}")
    pos, problem = found[k]
    if problem is not None:
        raise TextPromptError(f"{arg}: {s!r} in prompt {i} {problem}")
    return pos


def _int_pos(name: str, e: _Enc, i: int, p: int) -> int:
    n = len(e.ids)
    if not -n <= p < n:
        raise TextPromptError(f"roles[{name!r}]: position {p} is outside prompt {i} ({n} tokens "
                              f"with BOS: 0..{n - 1}, or -1..-{n} from the last)")
    return p % n


def _role(tok, name: str, spec, encs: list[_Enc]) -> list[int]:
    """Padded positions ``[n]`` of one role (see :func:`prompt_kwargs`)."""
    n, arg, occ = len(encs), f"roles[{name!r}]", None
    if (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], (str, list, tuple))
            and not isinstance(spec[1], bool) and isinstance(spec[1], int)):
        spec, occ = spec
    if isinstance(spec, torch.Tensor):
        spec = spec.tolist()
    items = [spec] * n if isinstance(spec, (str, int)) else spec
    if isinstance(items, Sequence) and len(items) != n:
        raise TextPromptError(f"{arg}: expected one per prompt ({n}), got {len(items)}")
    strings = isinstance(items, Sequence) and all(isinstance(x, str) for x in items)
    ints = isinstance(items, Sequence) and occ is None and all(
        isinstance(x, int) and not isinstance(x, bool) for x in items)
    if not (strings or ints):
        raise TextPromptError(
            f"{arg}: expected a substring of the prompts, a list of substrings (one per prompt), "
            "(substring or list, occurrence), a token position or a list of positions; got "
            f"{spec!r}")
    out = []
    for i, (e, x) in enumerate(zip(encs, items, strict=True)):
        p = _substring_pos(tok, name, e, i, x, occ) if strings else _int_pos(name, e, i, x)
        out.append(p + e.pad)
    return out


def _special_ids(tok, bos_on: bool) -> tuple[int | None, int]:
    bos = None
    if bos_on:
        bos = getattr(tok, "bos_token_id", None)
        if bos is None:
            raise TextPromptError("prepend_bos: the tokenizer has no BOS token to prepend; pass "
                                  "prepend_bos=False")
    pad = next((int(v) for v in (getattr(tok, "pad_token_id", None),
                                 getattr(tok, "eos_token_id", None)) if v is not None), 0)
    return (None if bos is None else int(bos)), pad


def prompt_kwargs(model, clean, corrupted=None, *, answers=None, wrong=None, roles=None,
                  padding_side=None, prepend_bos=None, name="prompts") -> dict:
    """The ``PromptSet`` keyword arguments for prompts given as strings; the arguments are
    those of ``PromptSet.from_text`` (documented there). Raises :class:`TextPromptError`."""
    tok, default_bos = _tokenizer(model)
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise TextPromptError(f"prepend_bos: expected True, False or None, got {prepend_bos!r}")
    bos_on = default_bos if prepend_bos is None else prepend_bos
    side = padding_side if padding_side is not None else (
        getattr(tok, "padding_side", None) or "right")
    if side not in _SIDES:
        what = "padding_side" if padding_side is not None else "padding_side (the tokenizer's)"
        raise TextPromptError(f"{what}: expected 'left' or 'right', got {side!r}")
    texts = _texts(clean, "clean")
    bos, pad_id = _special_ids(tok, bos_on)
    encs = _pad(_encode(tok, texts, bos, "clean"), side)
    tokens, mask = _rows(encs, pad_id, side)
    kw: dict = {"tokens": tokens, "attention_mask": None, "corrupted": None, "name": name,
                "vocab": tok}
    if any(e.pad for e in encs) or len({len(e.ids) for e in encs}) > 1:
        kw["attention_mask"] = mask
    if corrupted is not None:
        cencs = _encode(tok, _texts(corrupted, "corrupted", len(texts)), bos, "corrupted")
        _check_corrupted(tok, encs, cencs)
        kw["corrupted"] = _rows(cencs, pad_id, side)[0]
    kw["answers"] = _answer_ids(tok, answers, len(texts), "answers")
    kw["wrong"] = _answer_ids(tok, wrong, len(texts), "wrong")
    if roles is not None and not isinstance(roles, Mapping):
        raise TextPromptError(f"roles: expected a dict name -> spec, got {type(roles).__name__}")
    out = {k: _role(tok, k, v, encs) for k, v in (roles or {}).items()}
    if bos is not None and "BOS" not in out:
        out = {"BOS": [e.pad for e in encs], **out}
    kw["roles"] = out
    kw["text"] = tuple((tok.bos_token if bos is not None else "") + t for t in texts)
    return kw
