"""PromptSet: clean tokens, optional corrupted tokens, answers and position roles, validated."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["PromptSet", "PromptError"]


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


@dataclass(frozen=True, eq=False)
class PromptSet:
    """Prompts for an audit.

    Attributes (``batch`` = number of prompts, ``pos`` = padded length):
        tokens: clean token ids ``[batch, pos]``.
        attention_mask: ``[batch, pos]`` 1 for real tokens, 0 for padding; ``None`` = no padding.
        corrupted: corrupted token ids of the same shape as ``tokens`` (or ``None``).
        answers, wrong: ``[batch]`` answer and wrong-answer token ids (or ``None``).
        roles: role name -> ``[batch]`` position of that role in each prompt (e.g. ``S1``,
            ``END``). ``END`` defaults to the last real token of each prompt.
        text: optional prompt strings, for display.
        extra: name -> per-prompt tensor ``[batch, ...]`` that metrics may read (e.g. the
            reference embedding of each prompt's paired sentence); carried along by ``take``.
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

    def __post_init__(self):
        set_ = object.__setattr__
        tokens = _as_tokens(self.tokens, "tokens")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise PromptError("tokens: empty prompt set; need at least one prompt of length >= 1")
        set_(self, "tokens", tokens)
        n, p = tokens.shape
        if self.attention_mask is not None:
            m = torch.as_tensor(self.attention_mask).long()
            if m.shape != tokens.shape:
                raise PromptError(
                    f"attention_mask: expected shape {tuple(tokens.shape)} like tokens, "
                    f"got {tuple(m.shape)}"
                )
            if ((m != 0) & (m != 1)).any() or (m.sum(1) == 0).any():
                raise PromptError("attention_mask: expected 0/1 values and >=1 real token a row")
            set_(self, "attention_mask", m)
        if self.corrupted is not None:
            c = _as_tokens(self.corrupted, "corrupted")
            if c.shape != tokens.shape:
                raise PromptError(
                    f"corrupted: expected the same shape as the clean tokens {tuple(tokens.shape)}"
                    f", got {tuple(c.shape)}"
                )
            set_(self, "corrupted", c)
        for arg in ("answers", "wrong"):
            v = getattr(self, arg)
            if v is not None:
                v = torch.as_tensor(v).long().reshape(-1)
                if v.shape[0] != n:
                    raise PromptError(
                        f"{arg}: expected one token id per prompt ({n}), got {v.shape[0]}"
                    )
                set_(self, arg, v)
        roles = {k: torch.as_tensor(v).long().reshape(-1) for k, v in self.roles.items()}
        for k, v in roles.items():
            if v.numel() == 1:
                roles[k] = v.expand(n).clone()
            elif v.shape[0] != n:
                raise PromptError(f"roles[{k!r}]: expected one position per prompt ({n})")
            if (roles[k] < 0).any() or (roles[k] >= p).any():
                raise PromptError(f"roles[{k!r}]: positions must lie in 0..{p - 1}")
        roles.setdefault("END", self.lengths - 1)
        set_(self, "roles", roles)
        if self.text is not None:
            set_(self, "text", tuple(self.text))
        extra = {k: torch.as_tensor(v) for k, v in self.extra.items()}
        for k, v in extra.items():
            if v.ndim == 0 or v.shape[0] != n:
                raise PromptError(f"extra[{k!r}]: expected a tensor with one row per prompt ({n})")
        set_(self, "extra", extra)

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
    def valid(self) -> Tensor:
        """Bool ``[batch, pos]``: real (non-padding) tokens."""
        if self.attention_mask is None:
            return torch.ones_like(self.tokens, dtype=torch.bool)
        return self.attention_mask.bool()

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
        )

    def hash(self) -> str:
        h = hashlib.sha256()
        for t in (self.tokens, self.attention_mask, self.corrupted, self.answers, self.wrong):
            h.update(b"-" if t is None else t.numpy().tobytes())
        for k in sorted(self.roles):
            h.update(k.encode() + self.roles[k].numpy().tobytes())
        for k in sorted(self.extra):
            h.update(k.encode() + self.extra[k].float().numpy().tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def from_lists(cls, tokens: Sequence[Sequence[int]], **kw) -> PromptSet:
        return cls(tokens=_as_tokens(tokens, "tokens"), **kw)
