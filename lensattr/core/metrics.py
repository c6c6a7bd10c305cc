"""Metrics that declare what they read, so the evidence engines compute only that.

A metric says which *readout* it needs (:class:`Readout`): a few token columns of the logits at
one position per prompt (logit difference), the whole distribution at one position (answer
log-probability, KL to the clean output), or all logits (a plain callable: the documented slow
path). ``compute`` turns that readout into one number per prompt. A user's own function on the
logits at one position: :meth:`Metric.from_fn` (:mod:`lensattr.core.metric`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .metric import Metric, MetricError, MetricWarning, Readout, check_row_order, fn_takes_prompts
from .prompts import PromptSet

__all__ = [
    "LogitDiff",
    "AnswerLogProb",
    "KLToClean",
    "LogitsMetric",
    "PairCosine",
    "HiddenCosineToClean",
    "mean_pool",
    "as_metric",
    "read_rows",
]


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

    def __init__(self, fn: Callable[..., Tensor], name: str | None = None):  # fn(l, p) or fn(l)
        if not callable(fn):
            raise MetricError(f"metric: expected a Metric or a callable, got {type(fn).__name__}")
        self.fn = fn
        fn_name: str = getattr(fn, "__name__", "callable")
        self.name = name or fn_name
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


def read_rows(metric: Metric, prompts: PromptSet) -> torch.Tensor:
    """[batch, pos] bool: the positions the metric reads (its own ``read_positions``), real
    tokens only, on the CPU like the claims. Warns (:class:`MetricWarning`, once per audit) when
    they are every real position of prompts longer than one token and the metric does not
    declare that it reads every position (``reads_every_position``): a plain callable."""
    rows = torch.as_tensor(metric.read_positions(prompts), device="cpu").bool() & prompts.valid
    _warn_every_row(metric, rows, prompts.valid.cpu())
    return rows


def _warn_every_row(metric: Metric, rows: torch.Tensor, valid: torch.Tensor) -> None:
    if getattr(metric, "reads_every_position", False) or not bool((valid.sum(1) > 1).any()):
        return
    if bool((rows == valid).all()):
        warnings.warn(
            f"metric {metric.name!r} reads every position, so every real position is a read "
            "row: the claims 'at the read position' average over every query row and the "
            "hook-free engine cannot start from the read row (every intervention runs all "
            "logits on the bridge). If it reads one position, declare it: "
            "lensattr.Metric.from_fn(fn, position=\"END\") (fn then gets the logits there, "
            "[batch, d_vocab]). A Metric that pools every token by design sets "
            "reads_every_position = True.",
            MetricWarning, stacklevel=3)
