"""A user's own metric that declares what it reads: ``Metric.from_fn(fn, position="END")``.

A plain callable on all logits (:class:`~lensattr.metrics.LogitsMetric`) may read any
position, so every position is a read row (the claims "at the read position" then average over
every query row) and the hook-free engine cannot run from the read row. :class:`FnMetric`
reads the logits at one position per prompt only, and, with ``columns``, only those
unembedding columns: the same readout as :class:`~lensattr.metrics.LogitDiff`, so a function
computing the same logit difference gives the same values, bit for bit.

A scalar-returning function (TransformerLens's metrics usually end in ``.mean()``) is refused
with the fix rather than adapted by calling it on one prompt at a time: that is exact only when
the function takes nothing per prompt from outside its arguments, and a TransformerLens metric
usually takes the answer ids of the whole batch from a closure (``logits[:, answers]`` on one
row then silently mixes every prompt's answers).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import Tensor

from .metrics import Metric, MetricError, Readout, check_row_order, fn_takes_prompts
from .prompts import PromptSet

__all__ = ["FnMetric"]


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
    outside (refused on the first call, see :func:`~lensattr.metrics.check_row_order`).
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
        pos = self.positions
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
                cols = torch.as_tensor(got)
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
                         else self.positions.tolist()),
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
        t = torch.tensor([operator.index(position)])
    except TypeError:
        try:
            t = position if isinstance(position, Tensor) else torch.as_tensor(position)
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
        t = columns if isinstance(columns, Tensor) else torch.as_tensor(columns)
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
