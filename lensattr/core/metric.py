"""The metric contract: what a metric reads (:class:`Readout`), what it returns, the checks on
both, and a user's own function as a metric (:class:`FnMetric`, via :meth:`Metric.from_fn`).

Metrics declare what they read, so the evidence engines compute only that: a few token columns
of the logits at one position per prompt (logit difference), the whole distribution at one
position (answer log-probability, KL to the clean output), or all logits (a plain callable: the
documented slow path). ``compute`` turns that readout into one number per prompt. The bundled
metrics are in :mod:`lensattr.core.metrics`.

:class:`FnMetric` is a user's own metric that declares what it reads:
``Metric.from_fn(fn, position="END")``.

A plain callable on all logits (:class:`~lensattr.core.metrics.LogitsMetric`) may read any
position, so every position is a read row (the claims "at the read position" then average over
every query row) and the hook-free engine cannot run from the read row. :class:`FnMetric`
reads the logits at one position per prompt only, and, with ``columns``, only those
unembedding columns: the same readout as :class:`~lensattr.core.metrics.LogitDiff`, so a function
computing the same logit difference gives the same values, bit for bit.

A scalar-returning function (TransformerLens's metrics usually end in ``.mean()``) is refused
with the fix rather than adapted by calling it on one prompt at a time: that is exact only when
the function takes nothing per prompt from outside its arguments, and a TransformerLens metric
usually takes the answer ids of the whole batch from a closure (``logits[:, answers]`` on one
row then silently mixes every prompt's answers).
"""

from __future__ import annotations

import inspect
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .prompts import PromptSet

__all__ = ["Readout", "Metric", "FnMetric", "MetricError", "MetricWarning",
           "check_metric_output", "fn_takes_prompts", "check_row_order"]


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


class FnMetric(Metric):
    """``fn`` on the logits at ``position``: ``fn(logits)`` or ``fn(logits, prompts)`` ->
    ``[batch]``, one value per prompt.

    position: a role of the prompts (``"END"``, the last real token; ``"S2"``, ...), or one
        position per prompt (ints: a list or tensor ``[batch]``; one int for every prompt).
    columns: ``None`` (``fn`` gets the whole vocabulary, ``[batch, d_vocab]``), vocabulary
        ids read for every prompt (a list, ``[k]``), per prompt (a ``[batch, k]`` tensor), or
        a function ``prompts -> [batch, k]`` long tensor (e.g. the answer and wrong ids): ``fn``
        then gets ``[batch, k]``, column j the logit of id j of that prompt.
    name: shown in tables and errors (default ``fn.__name__``).

    ``fn`` sees rows in any order and number (the engines stack interventions along the batch):
    per-prompt data must come from ``prompts`` or ``columns``, never from a tensor captured
    outside (refused on the first call, see :func:`~lensattr.core.metrics.check_row_order`).
    """

    def __init__(self, fn: Callable, position="END", columns=None, name: str | None = None):
        if isinstance(fn, Metric):
            raise MetricError(f"fn: got the Metric {fn.name!r}; pass it to the audit as it is "
                              "(Metric.from_fn wraps a plain function of the logits)")
        if not callable(fn):
            raise MetricError(f"fn: expected a callable fn(logits) or fn(logits, prompts), got "
                              f"{type(fn).__name__}")
        if name is not None and not isinstance(name, str):
            raise MetricError(f"name: expected a string, got {type(name).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        self.takes_prompts = fn_takes_prompts(fn, f"metric {self.name!r}")
        self.position_role, self.positions = _parse_position(position)
        self.columns = _parse_columns(columns)

    # ---- what it reads ----------------------------------------------------------------------
    def _positions(self, prompts: PromptSet) -> Tensor:
        n, p = len(prompts), prompts.n_pos
        if self.position_role is not None:
            if self.position_role not in prompts.roles:
                raise MetricError(f"position: metric {self.name!r} reads role "
                                  f"{self.position_role!r}, but the prompts have roles "
                                  f"{sorted(prompts.roles)}")
            return prompts.roles[self.position_role]
        pos = cast(Tensor, self.positions)  # _parse_position: set whenever the role is None
        if pos.numel() == 1:
            pos = pos.expand(n).clone()
        if pos.shape[0] != n:
            raise MetricError(f"position: metric {self.name!r} has {pos.shape[0]} positions for "
                              f"{n} prompts; give one per prompt, or a role name such as 'END'")
        pos = pos.to(prompts.tokens.device)
        if (pos >= p).any():
            raise MetricError(f"position: {int(pos.max())} is out of range; these prompts have "
                              f"positions 0..{p - 1}")
        rows = torch.arange(n, device=pos.device)
        for arg, m in (("attention_mask", prompts.attention_mask),
                       ("corrupted_attention_mask", prompts.corrupted_attention_mask)):
            if m is not None and (m.to(pos.device)[rows, pos] == 0).any():
                i = int((m.to(pos.device)[rows, pos] == 0).nonzero()[0, 0])
                raise MetricError(f"position: {int(pos[i])} of prompt {i} is padding in {arg}; "
                                  "the metric must read a real token")
        return pos

    def _columns(self, prompts: PromptSet) -> Tensor:
        n, cols = len(prompts), self.columns
        if callable(cols):
            got = cols(prompts)
            try:
                cols = got if isinstance(got, Tensor) else torch.as_tensor(got, device="cpu")
            except (TypeError, ValueError, RuntimeError):
                raise MetricError(f"columns: the function returned {type(got).__name__}, "
                                  "expected a [batch, k] tensor of vocabulary ids") from None
            cols = _int_ids(cols, "columns: the function's result")
            if cols.ndim == 1:
                cols = cols[:, None]
        if cols.ndim == 1:
            cols = cols[None].expand(n, -1)
        if cols.ndim != 2 or cols.shape[0] != n or cols.shape[1] == 0:
            raise MetricError(f"columns: expected vocabulary ids [k] or [batch={n}, k>=1], got "
                              f"shape {tuple(cols.shape)}")
        size = None if prompts.vocab is None else prompts.vocab.size
        if size is not None and (cols >= size).any():
            raise MetricError(f"columns: id {int(cols.max())} is outside the vocabulary "
                              f"0..{size - 1}")
        return cols.to(prompts.tokens.device)

    def readout(self, prompts: PromptSet) -> Readout:
        pos = self._positions(prompts)
        if self.columns is None:
            return Readout("logits", pos)
        return Readout("columns", pos, self._columns(prompts))

    # ---- the values -------------------------------------------------------------------------
    def compute(self, values: Tensor, prompts: PromptSet, clean=None) -> Tensor:
        def call(v, p):
            return self.fn(v, p) if self.takes_prompts else self.fn(v)

        out = call(values, prompts)
        n, who = values.shape[0], f"metric {self.name!r} (Metric.from_fn)"
        if not isinstance(out, Tensor):
            hint = (" (one number for the whole batch: return the per-prompt tensor, e.g. drop "
                    "a final .mean() or .item())" if isinstance(out, (int, float)) else "")
            raise MetricError(f"{who}: fn returned {type(out).__name__}, expected a tensor of "
                              f"one value per prompt, shape ({n},){hint}")
        if out.ndim == 0:
            raise MetricError(
                f"{who}: fn returned one number for the whole batch (shape ()), expected one "
                f"value per prompt, shape ({n},). TransformerLens metrics usually end in "
                ".mean(); lensattr needs the per-prompt values (it takes ratios of means, "
                "intervals and sign-flip tests over prompts): drop the .mean()")
        if out.shape != (n,):
            raise MetricError(f"{who}: fn returned shape {tuple(out.shape)}, expected ({n},) = "
                              f"one value per prompt (fn gets logits {tuple(values.shape)})")
        if out.is_complex():
            raise MetricError(f"{who}: fn returned complex values; expected real ones")
        real = torch.isfinite(values.reshape(n, -1)).all(1) & (values.reshape(n, -1) != 0).any(1)
        bad = ~torch.isfinite(out.detach()) & real.to(out.device)
        if bad.any():
            raise MetricError(f"{who}: fn returned NaN or inf for prompt row(s) "
                              f"{bad.nonzero()[:, 0].tolist()[:8]} of finite logits")
        check_row_order(self, call, values, prompts, out)
        return out if out.is_floating_point() else out.float()

    def describe(self) -> dict:
        cols = self.columns
        if callable(cols):
            cols = f"fn {getattr(cols, '__qualname__', type(cols).__name__)}"
        elif cols is not None:
            cols = cols.tolist()
        fn = self.fn
        return {
            "name": self.name,
            "class": type(self).__name__,
            "position": (self.position_role if self.position_role is not None
                         else cast(Tensor, self.positions).tolist()),
            "fn": f"{getattr(fn, '__module__', '') or ''}."
                  f"{getattr(fn, '__qualname__', type(fn).__name__)}",
            "fn_args": "logits, prompts" if self.takes_prompts else "logits",
            "columns": cols,
            "reads": "logits[position, columns]" if cols is not None else "logits[position]",
        }


def _int_ids(t: Tensor, arg: str) -> Tensor:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise MetricError(f"{arg}: expected integer ids, got dtype {t.dtype} (values are not "
                          "rounded)")
    t = t.long()
    if (t < 0).any():
        raise MetricError(f"{arg}: ids must be >= 0, got {int(t.min())}")
    return t


def _parse_position(position) -> tuple[str | None, Tensor | None]:
    """(role, None) or (None, positions [batch] or [1])."""
    if isinstance(position, str):
        if not position:
            raise MetricError("position: expected a role name such as 'END', got ''")
        return position, None
    if isinstance(position, bool):
        raise MetricError("position: expected a role name or integer positions, got a bool")
    try:
        t = torch.tensor([operator.index(position)], device="cpu")
    except TypeError:
        try:
            t = (position if isinstance(position, Tensor)
                 else torch.as_tensor(position, device="cpu"))
        except (TypeError, ValueError, RuntimeError):
            raise MetricError(f"position: expected a role name (e.g. 'END') or one position per "
                              f"prompt, got {type(position).__name__}") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise MetricError(f"position: expected integer positions, got dtype {t.dtype}")
    if t.ndim > 1 or t.numel() == 0:
        raise MetricError(f"position: expected one position per prompt [batch], got shape "
                          f"{tuple(t.shape)}")
    t = t.long().reshape(-1).cpu()
    if (t < 0).any():
        raise MetricError(f"position: {int(t.min())} is out of range (negative positions are "
                          "not counted from the end, which padding moves: use the role 'END')")
    return None, t


def _parse_columns(columns):
    if columns is None or callable(columns):
        return columns
    if isinstance(columns, (str, bytes)):
        raise MetricError("columns: expected vocabulary ids (ints) or a function prompts -> "
                          "[batch, k] ids, got a string")
    try:
        t = columns if isinstance(columns, Tensor) else torch.as_tensor(columns, device="cpu")
    except (TypeError, ValueError, RuntimeError):
        raise MetricError(f"columns: expected vocabulary ids or a function prompts -> [batch, k]"
                          f" ids, got {type(columns).__name__}") from None
    t = _int_ids(t, "columns")
    if t.ndim == 0:
        t = t[None]
    if t.ndim > 2 or t.shape[-1] == 0:
        raise MetricError(f"columns: expected ids [k] or [batch, k] with k >= 1, got shape "
                          f"{tuple(t.shape)}")
    return t.cpu()
