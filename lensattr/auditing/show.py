"""``Audit.show``: the glue from an :class:`~lensattr.auditing.result.Audit` to the notebook
views of :mod:`lensattr.report.notebook`.

Patterns come from the saved tensors (``pattern_example``: prompt 0; ``pattern_mean``: the mean
over aligned prompts), so prompt 0 and ``"mean"`` work after :meth:`Audit.load` too. Other
prompts need the per-prompt patterns :func:`lensattr.audit` keeps in memory
(:class:`PromptPatterns`, never saved) when they fit in :data:`LIMIT` bytes.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from torch import Tensor

from ..report.data import effect_column, primary_baseline
from ..report.notebook import NotebookView, Source, grid_view, head_view

if TYPE_CHECKING:
    from .result import Audit

__all__ = ["LIMIT", "PromptPatterns", "keep_patterns", "show_audit"]

LIMIT = 64 * 2**20  # bytes of per-prompt patterns an audit keeps in memory for show()


@dataclass(frozen=True, eq=False)
class PromptPatterns:
    """Every prompt's attention, kept in memory for :meth:`Audit.show` (not saved).

    patterns: ``[batch, layer, head_index, query_pos, key_pos]``; tokens: per prompt, the
    token string at each (padded) position; valid: per prompt, its real positions; roles:
    role -> per-prompt position; read_pos: per prompt, the last read row."""

    patterns: Tensor
    tokens: list[list[str]]
    valid: list[list[int]]
    roles: dict[str, list[int]]
    read_pos: list[int]


def keep_patterns(patterns: Tensor, prompts, read_pos: Tensor, tokenizer,
                  limit: int = LIMIT) -> PromptPatterns | None:
    """The :class:`PromptPatterns` of an audit's ``prompts`` (a PromptSet), or None when the
    patterns take more than ``limit`` bytes. Token strings are ``tokenizer.decode([id])``
    (as ``meta["example_text_tokens"]``), the id itself without a tokenizer."""
    if patterns.numel() * patterns.element_size() > limit:
        return None
    ids = prompts.tokens.tolist()
    uniq = {i for row in ids for i in row}
    text = {i: (str(tokenizer.decode([i])) if tokenizer is not None else str(i)) for i in uniq}
    valid = prompts.valid
    return PromptPatterns(
        patterns=patterns.detach().cpu(), tokens=[[text[i] for i in row] for row in ids],
        valid=[row.nonzero()[:, 0].tolist() for row in valid],
        roles={k: [int(x) for x in v] for k, v in prompts.roles.items()},
        read_pos=[int(x) for x in read_pos])


@dataclass
class _Prompt:
    label: str
    tokens: list[str]  # at every (padded) position
    pattern: Callable[[int, int], np.ndarray]  # (layer, head) -> [query_pos, key_pos], padded
    positions: list[int]  # the positions shown (real tokens)
    roles: dict[str, int] | None  # role -> position on this prompt, where known
    read_pos: int | None  # the read row on this prompt, where known


def show_audit(audit: Audit, head=None, prompt: int | str = 0) -> NotebookView:
    """``audit.show()``: the verdict grid; ``audit.show((layer, head), prompt)``: that head's
    attention on ``prompt`` (an index, or ``"mean"``) with its claimed sources marked and its
    evidence; see :meth:`Audit.show`."""
    if head is None:
        return grid_view(audit.heads, audit.meta, audit.report_inputs()["run"])
    layer, h = _check_head(audit, head)
    row = audit.heads[(audit.heads["layer"] == layer) & (audit.heads["head"] == h)].iloc[0]
    pr = _prompt(audit, prompt)
    full = np.asarray(pr.pattern(layer, h), dtype=float)
    pattern = full[np.ix_(pr.positions, pr.positions)]
    sources, unplaced = _sources(audit.edges, layer, h, pr, full)
    note = ""
    if unplaced:
        note = (f"Not marked: {', '.join(unplaced)}: their positions on this prompt are not "
                "known (the prompts are not aligned and this audit does not record them for "
                f"prompt {prompt}).")
    verdict, sentence, evidence = _evidence(audit, row, (layer, h))
    return head_view((layer, h), pattern, [pr.tokens[p] for p in pr.positions], evidence,
                     sources, prompt=prompt, prompt_label=pr.label, verdict=verdict,
                     sentence=sentence, note=note)


def _check_head(audit: Audit, head) -> tuple[int, int]:
    if isinstance(head, str):
        m = re.fullmatch(r"L(\d+)H(\d+)", head.strip())
        head = (int(m[1]), int(m[2])) if m else head
    try:
        if isinstance(head, str | bytes) or any(isinstance(x, bool) for x in head):
            raise TypeError
        layer, h = (operator.index(x) for x in head)
    except (TypeError, ValueError):
        raise ValueError(f"head: expected (layer, head) integers or 'L<layer>H<head>', got "
                         f"{head!r}") from None
    n_layers = audit.meta.get("n_layers", int(audit.heads["layer"].max()) + 1)
    n_heads = audit.meta.get("n_heads", int(audit.heads["head"].max()) + 1)
    if not (0 <= layer < n_layers and 0 <= h < n_heads):
        raise ValueError(f"head: ({layer}, {h}) is out of range; the model has {n_layers} "
                         f"layers (0..{n_layers - 1}) of {n_heads} heads (0..{n_heads - 1})")
    audited = list(zip(audit.heads["layer"].astype(int), audit.heads["head"].astype(int),
                       strict=True))
    if (layer, h) not in audited:
        names = ", ".join(f"L{a}H{b}" for a, b in audited[:8])
        raise ValueError(f"head: ({layer}, {h}) was not audited; audited heads: {names}"
                         + (f" ... ({len(audited)} in all)" if len(audited) > 8 else ""))
    return layer, h


def _available(audit: Audit) -> str:
    out = ["0"] if "pattern_example" in audit.tensors else []
    if audit.prompt_patterns is not None:
        out = [f"0..{len(audit.prompt_patterns.tokens) - 1}"]
    if "pattern_mean" in audit.tensors:
        out.append("'mean'")
    return " or ".join(out) or "none"


def _prompt(audit: Audit, prompt) -> _Prompt:
    n = int(audit.meta.get("n_prompts") or 0)
    pp = audit.prompt_patterns
    if isinstance(prompt, str):
        if prompt != "mean":
            raise ValueError(f"prompt: expected a prompt index or 'mean', got {prompt!r}; "
                             f"available: {_available(audit)}")
        mean = audit.tensors.get("pattern_mean")
        if mean is None:
            raise ValueError("prompt: 'mean' needs the mean pattern over prompts, which only "
                             "aligned prompts (one length, roles at fixed positions) have; "
                             f"available: {_available(audit)}")
        saved = _saved_prompt0(audit)
        return _Prompt(f"the mean over {n} prompts (tokens of prompt 0)", saved.tokens,
                       lambda a, b: mean[a, b].numpy(), saved.positions, saved.roles,
                       saved.read_pos)
    try:
        if isinstance(prompt, bool):
            raise TypeError
        i = operator.index(prompt)
    except TypeError:
        raise ValueError(f"prompt: expected a prompt index or 'mean', got {prompt!r}; "
                         f"available: {_available(audit)}") from None
    if not 0 <= i < max(n, 1):
        raise ValueError(f"prompt: {i} is out of range; this audit has {n} prompts; "
                         f"available: {_available(audit)}")
    if pp is not None:
        return _Prompt(f"prompt {i}", pp.tokens[i], lambda a, b: pp.patterns[i, a, b].numpy(),
                       pp.valid[i], {k: v[i] for k, v in pp.roles.items()}, pp.read_pos[i])
    if i == 0 and "pattern_example" in audit.tensors:
        return _saved_prompt0(audit)
    ex = audit.tensors.get("pattern_example")
    size = n * (int(np.prod(ex.shape)) if ex is not None else 0) * 4
    why = (f"they take {size / 2**20:.0f} MB, more than the {LIMIT // 2**20} MB lensattr.audit() "
           "keeps in memory" if size > LIMIT else "lensattr.audit() keeps them in memory only "
           "(they are not saved), so an audit read with Audit.load has prompt 0 and the mean")
    raise ValueError(f"prompt: {i} needs every prompt's attention patterns, which this audit "
                     f"does not hold: {why}; available: {_available(audit)}")


def _saved_prompt0(audit: Audit) -> _Prompt:
    pat = audit.tensors.get("pattern_example")
    if pat is None:
        raise ValueError("prompt: this audit holds no attention patterns (no 'pattern_example' "
                         "tensor); available: none")
    n_pos = int(pat.shape[-1])
    toks = audit.tensors.get("example_tokens")
    tokens = list(audit.meta.get("example_text_tokens") or (
        [str(int(t)) for t in toks] if toks is not None else [f"pos{p}" for p in range(n_pos)]))
    if len(tokens) != n_pos:
        raise ValueError(f"prompt: the saved example prompt has {len(tokens)} token strings for "
                         f"a pattern over {n_pos} positions; the audit is inconsistent")
    positions, roles = list(range(n_pos)), None
    t = audit.tokens
    if len(t) and {"prompt", "pos"} <= set(t.columns):
        first = t[t["prompt"] == 0]
        if len(first):
            positions = sorted(int(p) for p in first["pos"] if 0 <= int(p) < n_pos)
            if "role" in first.columns:
                roles = {str(r): int(p) for r, p in zip(first["role"], first["pos"], strict=True)
                         if isinstance(r, str) and r}
    return _Prompt("prompt 0", tokens, lambda a, b: pat[a, b].numpy(), positions, roles, None)


def _read_block(edges: pd.DataFrame, layer: int, head: int) -> pd.DataFrame:
    """The head's edges at its read row(s): the first block of its rows (rows at the row where
    the effect lives, ``effect_locus`` edges, follow it with another query)."""
    if not len(edges) or not {"layer", "head"} <= set(edges.columns):
        return edges.iloc[0:0]
    rows = edges[(edges["layer"] == layer) & (edges["head"] == head)]
    if not len(rows):
        return rows
    role, qpos = rows["query_role"].iloc[0], _num(rows["query_pos"].iloc[0])
    same_pos = rows["query_pos"].map(_num).map(
        lambda q: (math.isnan(q) and math.isnan(qpos)) or q == qpos)
    return rows[(rows["query_role"] == role) & same_pos]


def _num(v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _sources(edges: pd.DataFrame, layer: int, head: int, pr: _Prompt, full: np.ndarray
             ) -> tuple[list[Source], list[str]]:
    block = _read_block(edges, layer, head)
    read = pr.read_pos
    if read is None and len(block) and math.isfinite(_num(block["query_pos"].iloc[0])):
        read = int(_num(block["query_pos"].iloc[0]))
    if len(block) and block["query_role"].iloc[0] == "read rows":
        read = None  # several read rows: no single row to read 'here' from
    shown = {p: i for i, p in enumerate(pr.positions)}
    out, unplaced = [], []
    for _, r in block.iterrows():
        name, sp = str(r["source_role"]), _num(r.get("source_pos"))
        pos = int(sp) if math.isfinite(sp) else (pr.roles or {}).get(name)
        if pos is None or pos not in shown:
            unplaced.append(name)
        here = float(full[read, pos]) if read is not None and pos in shown else None
        out.append(Source(
            name=name, pos=shown.get(pos) if pos is not None else None,
            attention=_num(r.get("attention")), norm_attention=_num(r.get("norm_attention")),
            effect=(_num(r.get("effect_remove")), _num(r.get("effect_remove_lo")),
                    _num(r.get("effect_remove_hi"))),
            claimed_share=_num(r.get("claimed_share")), is_sink=bool(r.get("is_sink", False)),
            here=here))
    return out, unplaced


def _text(v: object) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _evidence(audit: Audit, row: pd.Series, head: tuple[int, int]) -> tuple[str, str, list]:
    """The verdict, its sentence (the verdict record's when records exist, else the heads
    table's ``reason``) and the evidence rows beside the pattern."""
    sentence = _text(row.get("reason"))
    if audit.records:
        try:
            sentence = audit.verdict(head).sentence
        except ValueError:
            pass
    meta = dict(audit.meta)
    col, base = effect_column(audit.heads, meta), primary_baseline(audit.heads, meta)

    def ci(c: str) -> tuple[float, float, float]:
        return (_num(row.get(c)), _num(row.get(f"{c}_lo")), _num(row.get(f"{c}_hi")))

    rows: list = [("verdict", "verdict", _text(row.get("verdict")))]
    if col:
        rows.append(("effect", f"effect ({base} ablation) [95% CI]", ci(col)))
    for c, label in (("routing", "ρ (routing) [CI]"), ("sink_share", "sink share [CI]")):
        if c in row.index:
            rows.append((c, label, ci(c)))
    for c, label in (("carriers", "carriers"), ("top_source", "top source"),
                     ("head_type_read", "head type (read rows)"),
                     ("head_type", "head type (all queries)")):
        if c in row.index:
            rows.append((c, label, _text(row.get(c))))
    return _text(row.get("verdict")), sentence, rows
