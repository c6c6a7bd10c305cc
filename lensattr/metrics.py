"""Metrics that declare what they read, so the evidence engines compute only that.

A metric says which *readout* it needs (:class:`Readout`): a few token columns of the logits at
one position per prompt (logit difference), the whole distribution at one position (answer
log-probability, KL to the clean output), or all logits (a plain callable: the documented slow
path). ``compute`` turns that readout into one number per prompt. A user's own function on the
logits at one position: :meth:`Metric.from_fn` (``lensattr/metric_fn.py``).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .prompts import PromptSet

__all__ = [
    "Readout",
    "Metric",
    "LogitDiff",
    "AnswerLogProb",
    "KLToClean",
    "LogitsMetric",
    "PairCosine",
    "HiddenCosineToClean",
    "mean_pool",
    "as_metric",
    "MetricError",
    "MetricWarning",
]


class MetricError(ValueError):
    """A metric that cannot be computed, or returned something of the wrong shape."""


class MetricWarning(UserWarning):
    """A metric that works but costs the audit something (e.g. it reads every position)."""


@dataclass(frozen=True, eq=False)
class Readout:
    """What a metric reads from one forward pass.

    kind: ``"columns"`` = logits at ``positions`` for token ``columns`` only ([batch, k]);
    ``"logits"`` = the whole vocabulary at ``positions`` ([batch, d_vocab]);
    ``"all_logits"`` = every position ([batch, pos, d_vocab]);
    ``"hidden"`` = the final hidden states ([batch, pos, d_model]), for encoders.
    """

    kind: Literal["columns", "logits", "all_logits", "hidden"]
    positions: Int[Tensor, " batch"] | None = None
    columns: Int[Tensor, "batch k"] | None = None

    def take(self, idx: Tensor) -> Readout:
        def g(t):
            return None if t is None else t[idx]

        return Readout(self.kind, g(self.positions), g(self.columns))


class Metric:
    """Base class. Subclasses set ``name`` and implement ``readout`` and ``compute``."""

    name: str = "metric"
    needs_clean: bool = False  # compute() wants the clean run's readout for the same prompts
    position_role: str | None = "END"
    # True on a metric that by design reads every real token (mean pooling): the audit then
    # does not warn that every position is a read row
    reads_every_position: bool = False

    @staticmethod
    def from_fn(fn: Callable, position="END", columns=None, name: str | None = None) -> Metric:
        """Your own function of the logits at one position per prompt, as a Metric that
        declares what it reads (the hook-free engine and the one-row claims stay on).

        ``fn(logits)`` (TransformerLens's convention) or ``fn(logits, prompts)``, told apart
        by its signature: ``logits`` is ``[batch, d_vocab]`` at ``position`` (a role such as
        ``"END"``, or one position per prompt), or ``[batch, k]`` when ``columns`` (vocabulary
        ids: a list, a ``[batch, k]`` tensor, or ``prompts -> [batch, k]``) is declared. It
        must return one value per prompt, ``[batch]``; see :class:`lensattr.metric_fn.FnMetric`.
        """
        from .metric_fn import FnMetric

        return FnMetric(fn, position=position, columns=columns, name=name)

    def readout(self, prompts: PromptSet) -> Readout:
        raise NotImplementedError

    def compute(self, values: Tensor, prompts: PromptSet, clean: Tensor | None) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "class": type(self).__name__, "position": self.position_role}

    def read_positions(self, prompts: PromptSet) -> Bool[Tensor, "batch pos"]:
        """The positions whose final state this metric reads, per prompt: True where it reads.

        One-position metrics (logit difference, answer log-prob, KL, one token's hidden state)
        read their role (``position_role``, e.g. END); pooling metrics override this (mean
        pooling reads every real token). Claims and edge edits examine these query rows."""
        pos = self._positions(prompts)  # [batch]
        dev = prompts.tokens.device  # a prompt-side mask, where the prompts live
        out = torch.zeros(len(prompts), prompts.n_pos, dtype=torch.bool, device=dev)
        out[torch.arange(len(prompts), device=dev), pos.to(dev)] = True
        return out

    def _positions(self, prompts: PromptSet) -> Tensor:
        if self.position_role not in prompts.roles:
            raise MetricError(
                f"metric {self.name!r}: reads role {self.position_role!r}, but the prompts have "
                f"roles {sorted(prompts.roles)}"
            )
        return prompts.roles[self.position_role]


class LogitDiff(Metric):
    """logit(answer) - logit(wrong) at one position (default the last real token)."""

    def __init__(self, position: str = "END"):
        self.position_role = position
        self.name = "logit_diff"

    def readout(self, prompts: PromptSet) -> Readout:
        if prompts.answers is None or prompts.wrong is None:
            raise MetricError("metric 'logit_diff': the prompts need answers and wrong answers")
        cols = torch.stack([prompts.answers, prompts.wrong], dim=1)  # [batch, 2]
        return Readout("columns", self._positions(prompts), cols)

    def compute(self, values: Float[Tensor, "batch 2"], prompts, clean=None) -> Tensor:
        return values[:, 0] - values[:, 1]


class AnswerLogProb(Metric):
    """log p(answer) at one position."""

    def __init__(self, position: str = "END"):
        self.position_role = position
        self.name = "answer_logprob"

    def readout(self, prompts: PromptSet) -> Readout:
        if prompts.answers is None:
            raise MetricError("metric 'answer_logprob': the prompts need answers")
        return Readout("logits", self._positions(prompts), prompts.answers[:, None])

    def compute(self, values: Float[Tensor, "batch vocab"], prompts, clean=None) -> Tensor:
        logp = values.log_softmax(-1)
        return logp.gather(1, prompts.answers[:, None].to(values.device))[:, 0]


class KLToClean(Metric):
    """KL(clean || intervened) of the next-token distribution at one position (0 on clean)."""

    needs_clean = True

    def __init__(self, position: str = "END"):
        self.position_role = position
        self.name = "kl_to_clean"

    def readout(self, prompts: PromptSet) -> Readout:
        return Readout("logits", self._positions(prompts))

    def compute(self, values, prompts, clean=None) -> Tensor:
        if clean is None:
            raise MetricError("metric 'kl_to_clean' needs the clean run's logits")
        p = clean.log_softmax(-1)
        q = values.log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1)


class LogitsMetric(Metric):
    """Wraps a plain callable ``fn(logits [batch, pos, d_vocab], prompts) -> [batch]`` (or
    ``fn(logits)``, TransformerLens's convention, told apart by its signature).

    This is the slow path: the engine must compute every logit at every position, and every
    real position is a read row (the audit warns). A function that reads one position is
    faster and claims more precisely as ``Metric.from_fn(fn, position="END")``.
    """

    position_role = None
    takes_prompts = True  # set on the instance only when False: older run keys stay valid

    def __init__(self, fn: Callable[[Tensor, PromptSet], Tensor], name: str | None = None):
        if not callable(fn):
            raise MetricError(f"metric: expected a Metric or a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")
        if not fn_takes_prompts(fn, f"metric {self.name!r}"):
            self.takes_prompts = False

    def readout(self, prompts: PromptSet) -> Readout:
        return Readout("all_logits")

    def read_positions(self, prompts: PromptSet) -> Bool[Tensor, "batch pos"]:
        """A plain callable may read any position: every real token."""
        return prompts.valid.clone()

    def compute(self, values, prompts, clean=None) -> Tensor:
        def call(v, p):
            return self.fn(v, p) if self.takes_prompts else self.fn(v)

        out = call(values, prompts)
        check_row_order(self, call, values, prompts, out)
        return out


def mean_pool(hidden: Float[Tensor, "batch pos d_model"], valid: Tensor | None
              ) -> Float[Tensor, "batch d_model"]:
    """Mean of the hidden states over real (non-padding) tokens."""
    if valid is None:
        return hidden.mean(1)
    w = valid.to(hidden.dtype)[:, :, None]
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1)


class PairCosine(Metric):
    """Cosine similarity of the prompt's mean-pooled final hidden states with a reference
    embedding of its paired sentence (``prompts.extra[key]``, [batch, d_model]), computed once
    on the clean model: interventions act on the prompt only. The sentence-pair similarity of
    sentence encoders such as all-MiniLM-L6-v2."""

    position_role = None
    reads_every_position = True

    def __init__(self, key: str = "pair_embedding"):
        self.key = key
        self.name = "pair_cosine"

    def readout(self, prompts: PromptSet) -> Readout:
        if self.key not in prompts.extra:
            raise MetricError(f"metric 'pair_cosine': the prompts need extra[{self.key!r}], the "
                              "paired sentences' embeddings [batch, d_model]")
        return Readout("hidden")

    def read_positions(self, prompts: PromptSet) -> Bool[Tensor, "batch pos"]:
        """Mean pooling reads every real (non-padding) token."""
        return prompts.valid.clone()

    def compute(self, values, prompts, clean=None) -> Tensor:
        valid = None if prompts.attention_mask is None else prompts.valid.to(values.device)
        emb = mean_pool(values, valid)
        ref = prompts.extra[self.key].to(emb)
        return torch.nn.functional.cosine_similarity(emb, ref, dim=-1)


class HiddenCosineToClean(Metric):
    """Cosine similarity of one token's final hidden state (role ``position``) with its clean
    value: 1 on the clean run; how much that token's representation depends on what is cut."""

    needs_clean = True

    def __init__(self, position: str = "TOK"):
        self.position_role = position
        self.name = "hidden_cosine_to_clean"

    def readout(self, prompts: PromptSet) -> Readout:
        return Readout("hidden", self._positions(prompts))

    def compute(self, values, prompts, clean=None) -> Tensor:
        if clean is None:
            raise MetricError("metric 'hidden_cosine_to_clean' needs the clean run's states")
        rows = torch.arange(values.shape[0], device=values.device)
        pos = prompts.roles[self.position_role].to(values.device)
        return torch.nn.functional.cosine_similarity(values[rows, pos], clean[rows, pos], dim=-1)


def as_metric(metric) -> Metric:
    if isinstance(metric, Metric):
        return metric
    return LogitsMetric(metric)


def check_metric_output(out, n: int, name: str) -> Tensor:
    """A metric must return a finite float tensor of shape [batch]."""
    if not isinstance(out, Tensor):
        raise MetricError(f"metric {name!r}: returned {type(out).__name__}, expected a tensor")
    if out.ndim == 0 and n > 1:
        raise MetricError(
            f"metric {name!r}: returned shape (), expected ({n},) = one value per prompt; it "
            "returned one number for the whole batch: return the per-prompt values (e.g. drop "
            "a final .mean())"
        )
    if out.shape != (n,):
        raise MetricError(
            f"metric {name!r}: returned shape {tuple(out.shape)}, expected ({n},) = one value "
            "per prompt"
        )
    return out.float()


def fn_takes_prompts(fn: Callable, who: str) -> bool:
    """Is ``fn`` called ``fn(logits, prompts)`` (True) or ``fn(logits)`` (False)? Read from its
    signature, never by calling it: two required positional arguments (or ``*args``, or a
    second one named ``prompts``) mean both; one means logits only (TransformerLens's
    convention; a second argument with a default, e.g. ``answer_tokens=...``, is left alone).
    A callable whose signature cannot be read is called with both."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    ps = list(sig.parameters.values())
    pos = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    need = [p.name for p in pos if p.default is p.empty]
    kw_need = [p.name for p in ps if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if len(need) > 2 or kw_need:
        raise MetricError(f"{who}: fn must take (logits) or (logits, prompts); it requires "
                          f"{need + kw_need}")
    if len(need) == 2 or any(p.kind == p.VAR_POSITIONAL for p in ps):
        return True
    if not pos:
        raise MetricError(f"{who}: fn must take (logits) or (logits, prompts); it takes no "
                          "positional argument")
    return len(pos) >= 2 and pos[1].name == "prompts"


_ROW_ORDER_CHECKED: weakref.WeakSet = weakref.WeakSet()


def check_row_order(metric: Metric, call: Callable, values: Tensor, prompts: PromptSet,
                    out) -> None:
    """Once per metric object: the same rows in reverse order (logits and prompts) must give
    the same values in reverse order. The engines evaluate a metric on chunks of rows in any
    order and number, so a function that takes per-prompt data (answer ids) from a tensor
    captured outside, instead of from ``prompts`` or declared ``columns``, would be silently
    wrong; this refuses it on its first call (the clean run)."""
    n = values.shape[0]
    if (n < 2 or not isinstance(out, Tensor) or out.shape != (n,) or len(prompts) != n
            or metric in _ROW_ORDER_CHECKED):
        return
    _ROW_ORDER_CHECKED.add(metric)
    with torch.no_grad():
        back = values.detach().flip(0)
        again = call(back, prompts.take(torch.arange(n - 1, -1, -1, device=prompts.tokens.device)))
        want = out.detach().float().flip(0)
        ok = isinstance(again, Tensor) and again.shape == want.shape and torch.allclose(
            again.detach().float().to(want.device), want, rtol=1e-4,
            atol=1e-5 * (1.0 + float(want.nan_to_num(0.0, 0.0, 0.0).abs().max())), equal_nan=True)
    if not ok:
        raise MetricError(
            f"metric {metric.name!r}: its values depend on the order of the rows it is given "
            "(the same logits and prompts in reverse order gave other values). The engines "
            "evaluate a metric on rows in any order and number, so per-prompt data (answer "
            "ids, ...) must come from `prompts` (fn(logits, prompts)) or from declared "
            "`columns=`, not from a tensor captured outside the function"
        )
