"""PromptSet: clean tokens, optional corrupted tokens, answers and position roles, validated."""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias

import torch
from jaxtyping import Int
from torch import Tensor

from . import text_prompts

__all__ = ["PromptSet", "PromptError", "VocabFingerprint", "vocab_fingerprint"]

# What PromptSet's constructor accepts; __post_init__ turns each into the tensor it stores.
_TokenIds: TypeAlias = "Tensor | Sequence[Sequence[int]] | Sequence[int]"  # [batch, pos] | [pos]
_Positions: TypeAlias = "Tensor | int | Sequence[int]"  # [batch] ids/positions, or one for all


class _HasVocab(Protocol):
    """A tokenizer as far as :func:`vocab_fingerprint` reads it."""

    def get_vocab(self) -> dict[str, int]: ...


class PromptError(ValueError):
    """Invalid prompts; the message names the argument and what was expected."""


def _as_tokens(x, arg: str) -> Tensor:
    if isinstance(x, Tensor):
        t = x
    else:
        rows = list(x)
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise PromptError(
                f"{arg}: prompts of unequal length {sorted(lengths)}; pad them to one length and "
                "pass attention_mask (1 = real token, 0 = padding)"
            )
        t = torch.tensor(rows)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise PromptError(f"{arg}: expected token ids of shape [batch, pos], got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise PromptError(f"{arg}: expected integer token ids, got dtype {t.dtype}")
    return t.long()


def _as_positions(x, arg: str) -> Tensor:
    """Integer ids or positions as a 1-d long tensor; floats and booleans are refused, never
    truncated (``1.7`` is not position 1)."""
    try:
        t = x if isinstance(x, Tensor) else torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise PromptError(f"{arg}: expected integers, got {type(x).__name__}") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise PromptError(f"{arg}: expected integers, got dtype {t.dtype} (values are not "
                          "rounded or truncated)")
    return t.long().reshape(-1)


def _as_mask(x, arg: str, shape) -> Tensor:
    m = torch.as_tensor(x)
    if tuple(m.shape) != tuple(shape):
        raise PromptError(f"{arg}: expected shape {tuple(shape)} like tokens, got {tuple(m.shape)}")
    if ((m != 0) & (m != 1)).any() or (m.sum(1) == 0).any():
        raise PromptError(f"{arg}: expected 0/1 values and >=1 real token a row")
    return m.long()


@dataclass(frozen=True)
class VocabFingerprint:
    """Which vocabulary token ids are for: a digest of the tokenizer's token -> id mapping.

    Two fingerprints are equal when the digests are (``name`` is for messages only)."""

    digest: str
    size: int
    name: str = field(default="", compare=False)

    def __str__(self) -> str:
        who = f"{self.name!r} " if self.name else ""
        return f"{who}({self.size} tokens, vocabulary sha256 {self.digest[:12]})"


def vocab_fingerprint(tokenizer, name: str | None = None) -> VocabFingerprint:
    """The :class:`VocabFingerprint` of a Hugging Face tokenizer (its ``get_vocab()``)."""
    if not callable(getattr(tokenizer, "get_vocab", None)):
        raise PromptError(f"vocab: expected a tokenizer with get_vocab(), got "
                          f"{type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    if name is None:
        raw = getattr(tokenizer, "name_or_path", "") or (
            getattr(tokenizer, "init_kwargs", None) or {}).get("name_or_path", "")
        name = Path(str(raw)).name if raw else ""
    return VocabFingerprint(digest, len(vocab), name)


@dataclass(frozen=True, eq=False)
class PromptSet:
    """Prompts for an audit.

    Attributes (``batch`` = number of prompts, ``pos`` = padded length):
        tokens: clean token ids ``[batch, pos]``.
        attention_mask: ``[batch, pos]`` 1 for real tokens, 0 for padding; ``None`` = no padding.
            Left or right padding (or any 0/1 pattern with a real token in each row).
        corrupted: corrupted token ids of the same shape as ``tokens`` (or ``None``).
        corrupted_attention_mask: the corrupted prompts' own mask ``[batch, pos]``; default the
            clean ``attention_mask``. Every role must sit on a real token in both.
        answers, wrong: ``[batch]`` answer and wrong-answer token ids (or ``None``); integers
            only (floats are refused, not truncated).
        roles: role name -> ``[batch]`` position of that role in each prompt (e.g. ``S1``,
            ``END``), on a real token. ``END`` defaults to the last real token of each prompt
            (under left padding too).
        text: optional prompt strings, for display.
        extra: name -> per-prompt tensor ``[batch, ...]`` that metrics may read (e.g. the
            reference embedding of each prompt's paired sentence); carried along by ``take``.
        vocab: the vocabulary the token ids are for (a :class:`VocabFingerprint`, or a
            tokenizer to take it from); ``None`` = not recorded, not checked. A model whose
            tokenizer has another vocabulary is refused (:meth:`validate_tokenizer`).
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"] | None = None
    corrupted: Int[Tensor, "batch pos"] | None = None
    answers: Int[Tensor, " batch"] | None = None
    wrong: Int[Tensor, " batch"] | None = None
    roles: dict[str, Tensor] = field(default_factory=dict)
    text: tuple[str, ...] | None = None
    name: str = "prompts"
    extra: dict[str, Tensor] = field(default_factory=dict)
    corrupted_attention_mask: Int[Tensor, "batch pos"] | None = None
    vocab: VocabFingerprint | None = None

    if TYPE_CHECKING:  # the generated __init__, with the inputs __post_init__ converts
        def __init__(
            self,
            tokens: _TokenIds,
            attention_mask: _TokenIds | None = None,
            corrupted: _TokenIds | None = None,
            answers: _Positions | None = None,
            wrong: _Positions | None = None,
            roles: Mapping[str, _Positions] = ...,
            text: Sequence[str] | None = None,
            name: str = "prompts",
            extra: Mapping[str, Tensor] = ...,
            corrupted_attention_mask: _TokenIds | None = None,
            vocab: VocabFingerprint | _HasVocab | None = None,
        ) -> None: ...

    def __post_init__(self):
        set_ = object.__setattr__
        tokens = _as_tokens(self.tokens, "tokens")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise PromptError("tokens: empty prompt set; need at least one prompt of length >= 1")
        set_(self, "tokens", tokens)
        n, p = tokens.shape
        if self.attention_mask is not None:
            set_(self, "attention_mask", _as_mask(self.attention_mask, "attention_mask", (n, p)))
        if self.corrupted is not None:
            c = _as_tokens(self.corrupted, "corrupted")
            if c.shape != tokens.shape:
                raise PromptError(
                    f"corrupted: expected the same shape as the clean tokens {tuple(tokens.shape)}"
                    f", got {tuple(c.shape)}"
                )
            set_(self, "corrupted", c)
        cmask = self.corrupted_attention_mask
        if cmask is not None:
            if self.corrupted is None:
                raise PromptError("corrupted_attention_mask: given without corrupted prompts")
            cmask = _as_mask(cmask, "corrupted_attention_mask", (n, p))
        set_(self, "corrupted_attention_mask",
             self.attention_mask if cmask is None and self.corrupted is not None else cmask)
        for arg in ("answers", "wrong"):
            v = getattr(self, arg)
            if v is not None:
                v = _as_positions(v, arg)
                if v.shape[0] != n:
                    raise PromptError(
                        f"{arg}: expected one token id per prompt ({n}), got {v.shape[0]}"
                    )
                set_(self, arg, v)
        roles = {k: _as_positions(v, f"roles[{k!r}]") for k, v in self.roles.items()}
        for k, v in roles.items():
            if v.numel() == 1:
                roles[k] = v.expand(n).clone()
            elif v.shape[0] != n:
                raise PromptError(f"roles[{k!r}]: expected one position per prompt ({n})")
            if (roles[k] < 0).any() or (roles[k] >= p).any():
                raise PromptError(f"roles[{k!r}]: positions must lie in 0..{p - 1}")
        roles.setdefault("END", self.last_real)
        for arg, m in (("attention_mask", self.attention_mask),
                       ("corrupted_attention_mask", self.corrupted_attention_mask)):
            for k, v in ({} if m is None else roles).items():
                pad = m[torch.arange(n), v] == 0
                if pad.any():
                    i = int(pad.nonzero()[0, 0])
                    raise PromptError(f"roles[{k!r}]: position {int(v[i])} of prompt {i} is "
                                      f"padding in {arg}; roles must sit on real tokens")
        set_(self, "roles", roles)
        if self.text is not None:
            set_(self, "text", tuple(self.text))
        extra = {k: torch.as_tensor(v) for k, v in self.extra.items()}
        for k, v in extra.items():
            if v.ndim == 0 or v.shape[0] != n:
                raise PromptError(f"extra[{k!r}]: expected a tensor with one row per prompt ({n})")
        set_(self, "extra", extra)
        if self.vocab is not None and not isinstance(self.vocab, VocabFingerprint):
            set_(self, "vocab", vocab_fingerprint(self.vocab))

    # ---- derived -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_pos(self) -> int:
        return self.tokens.shape[1]

    @property
    def lengths(self) -> Tensor:
        if self.attention_mask is None:
            return torch.full((len(self),), self.n_pos, dtype=torch.long)
        return self.attention_mask.sum(1)

    @property
    def last_real(self) -> Tensor:
        """``[batch]`` position of the last real token of each prompt (left or right padding)."""
        if self.attention_mask is None:
            return torch.full((len(self),), self.n_pos - 1, dtype=torch.long)
        pos = torch.arange(self.n_pos).expand_as(self.attention_mask)
        return torch.where(self.attention_mask.bool(), pos, -1).max(1).values

    @property
    def valid(self) -> Tensor:
        """Bool ``[batch, pos]``: real (non-padding) tokens."""
        if self.attention_mask is None:
            return torch.ones_like(self.tokens, dtype=torch.bool)
        return self.attention_mask.bool()

    @property
    def padding_side(self) -> str | None:
        """"left" / "right" (every padded prompt on that side), None (no padding), or "mixed"."""
        m = self.attention_mask
        if m is None or bool(m.all()):
            return None
        left, right = bool((m[:, 1:] >= m[:, :-1]).all()), bool((m[:, 1:] <= m[:, :-1]).all())
        return "left" if left else "right" if right else "mixed"

    @property
    def aligned(self) -> bool:
        """True when every prompt has the same length and every role the same position."""
        same_roles = all(bool((v == v[0]).all()) for v in self.roles.values())
        return self.attention_mask is None and same_roles

    def role_of(self, pos: int) -> str | None:
        """The role that sits at ``pos`` in every prompt, if any (aligned prompts)."""
        for k, v in self.roles.items():
            if bool((v == pos).all()):
                return k
        return None

    def validate_vocab(self, d_vocab: int) -> None:
        for arg in ("tokens", "corrupted", "answers", "wrong"):
            v = getattr(self, arg)
            if v is not None and ((v < 0).any() or (v >= d_vocab).any()):
                bad = v[(v < 0) | (v >= d_vocab)][0].item()
                raise PromptError(
                    f"{arg}: token id {bad} is outside the model's vocabulary 0..{d_vocab - 1}"
                )

    def validate_length(self, n_ctx: int | None) -> None:
        """Refuse prompts longer than the model's context (``n_ctx`` positions)."""
        if n_ctx is not None and self.n_pos > int(n_ctx):
            raise PromptError(
                f"tokens: prompts of {self.n_pos} positions are longer than the model's context "
                f"n_ctx = {int(n_ctx)}; shorten them (or pad less)"
            )

    def validate_tokenizer(self, tokenizer, model_name: str = "model") -> None:
        """Refuse a model whose tokenizer has another vocabulary than the one these prompts'
        token ids are for (when the prompts record one, see ``vocab``)."""
        if self.vocab is None:
            return
        if tokenizer is None:
            raise PromptError(
                f"prompts: {self.name!r} are token ids for the vocabulary of {self.vocab}; model "
                f"{model_name!r} has no tokenizer to check it against. Attach its tokenizer, "
                "or build the prompts with vocab=None to skip this check"
            )
        theirs = vocab_fingerprint(tokenizer)
        if theirs != self.vocab:
            raise PromptError(
                f"prompts: {self.name!r} are token ids for the vocabulary of {self.vocab}; model "
                f"{model_name!r} has another vocabulary {theirs}, so the ids would mean other "
                "tokens. Use prompts built with this model's tokenizer or a task made for it"
            )

    def first(self, n, arg: str = "n_prompts") -> PromptSet:
        """The first ``n`` prompts (all of them when ``n`` is None); more than there are, or a
        non-integer ``n``, is refused."""
        if n is None:
            return self
        try:
            n = operator.index(n)
        except TypeError:
            raise PromptError(f"{arg}: expected an integer, got {n!r}") from None
        if not 1 <= n <= len(self):
            raise PromptError(f"{arg}: expected 1..{len(self)} (the prompt set {self.name!r} has "
                              f"{len(self)} prompts), got {n}")
        return self if n == len(self) else self.take(torch.arange(n))

    def corrupted_view(self) -> PromptSet:
        """The corrupted prompts as a PromptSet of their own (their tokens and their mask; the
        same answers, roles and extra), for the corrupted reference run."""
        if self.corrupted is None:
            raise PromptError("corrupted: these prompts have no corrupted version")
        return PromptSet(tokens=self.corrupted, attention_mask=self.corrupted_attention_mask,
                         answers=self.answers, wrong=self.wrong, roles=self.roles,
                         name=f"{self.name} (corrupted)", extra=self.extra, vocab=self.vocab)

    def take(self, idx: Tensor) -> PromptSet:
        """Rows ``idx`` (may repeat): used to replicate prompts across a batch of interventions."""

        def g(t):
            return None if t is None else t[idx]

        return PromptSet(
            tokens=self.tokens[idx],
            attention_mask=g(self.attention_mask),
            corrupted=g(self.corrupted),
            answers=g(self.answers),
            wrong=g(self.wrong),
            roles={k: v[idx] for k, v in self.roles.items()},
            text=None if self.text is None else tuple(self.text[i] for i in idx.tolist()),
            name=self.name,
            extra={k: v[idx] for k, v in self.extra.items()},
            corrupted_attention_mask=g(self.corrupted_attention_mask),
            vocab=self.vocab,
        )

    def hash(self) -> str:
        h = hashlib.sha256()
        for t in (self.tokens, self.attention_mask, self.corrupted, self.answers, self.wrong):
            h.update(b"-" if t is None else t.numpy().tobytes())
        for k in sorted(self.roles):
            h.update(k.encode() + self.roles[k].numpy().tobytes())
        for k in sorted(self.extra):
            h.update(k.encode() + self.extra[k].float().numpy().tobytes())
        cm, m = self.corrupted_attention_mask, self.attention_mask
        if cm is not None and (m is None or not torch.equal(cm, m)):  # default: not hashed
            h.update(b"corrupted_attention_mask" + cm.numpy().tobytes())
        if self.vocab is not None:
            h.update(b"vocab" + self.vocab.digest.encode())
        return h.hexdigest()[:16]

    @classmethod
    def from_text(cls, model, clean: str | Sequence[str], corrupted: Sequence[str] | None = None,
                  *, answers=None, wrong=None, roles: Mapping | None = None,
                  padding_side: str | None = None, prepend_bos: bool | None = None,
                  name: str = "prompts") -> PromptSet:
        """Prompts from strings, tokenised as a TransformerBridge's ``model.to_tokens(clean,
        prepend_bos=..., padding_side=...)`` does (details: :mod:`lensattr.core.text_prompts`).

        Args:
            model: a TransformerBridge (``prepend_bos`` default: its cfg.default_prepend_bos)
                or a Hugging Face tokenizer (default True). ``clean``: a string or a sequence.
            corrupted: one string per clean prompt, of its token length (or None).
            answers, wrong: a string (every prompt), a list (one per prompt) or token ids.
            roles: name -> a substring (the token holding its last character), a list of them,
                ``(substring_or_list, occurrence)``, or token positions (BOS included; negative:
                from the last real token). ``BOS`` is added when prepended; ``END``: last token.
            padding_side: "left" or "right" (default: the tokenizer's, else "right").

        Returns:
            A PromptSet: roles in padded coordinates, ``text`` with BOS, ``vocab`` recorded.
        Raises:
            PromptError: naming the argument (see text_prompts for every case).
        """
        try:
            kw = text_prompts.prompt_kwargs(
                model, clean, corrupted, answers=answers, wrong=wrong, roles=roles,
                padding_side=padding_side, prepend_bos=prepend_bos, name=name)
        except text_prompts.TextPromptError as e:
            raise PromptError(str(e)) from None
        return cls(**kw)

    @classmethod
    def from_lists(cls, tokens: Sequence[Sequence[int]], **kw) -> PromptSet:
        return cls(tokens=_as_tokens(tokens, "tokens"), **kw)
