"""The report's data, as JSON-able values: table specs (CI columns folded), and which head
columns are effects under which baseline. Pure functions of the audit's tables; no HTML."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["BASELINES", "encode", "head_id", "ci_columns", "table_spec", "primary_baseline",
           "effect_column", "cell"]

BASELINES = ("zero", "mean", "resample")
# shown first in the heads table, in this order, when present
HEADS_FIRST = ("verdict", "reason", "effect", "routing", "partner", "carriers", "head_type_read",
               "top_source", "relevance", "routing_class", "verdict_share", "q_value")
EDGES_FIRST = ("verdict", "query_role", "source_role", "effect_remove", "effect_pattern",
               "attention", "norm_attention", "claimed_share", "is_sink")


def encode(value: object) -> object:
    """One JSON value: floats to 4 significant digits, NaN/None -> null, ±inf -> "inf"/"-inf"
    strings (JSON has no infinities), numpy scalars to Python ones, other things to str."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        x = float(value)
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return float(f"{x:.4g}")
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def head_id(layer: int, head: int) -> str:
    return f"L{int(layer)}H{int(head)}"


def ci_columns(columns: Sequence[str]) -> list[str]:
    """Columns X that have both ``X_lo`` and ``X_hi`` beside them."""
    present = set(columns)
    return [c for c in columns if f"{c}_lo" in present and f"{c}_hi" in present]


def cell(row: pd.Series, column: str) -> object:
    """A value, or ``[value, lo, hi]`` when the column has a CI beside it."""
    v = encode(row.get(column))
    if f"{column}_lo" in row.index and f"{column}_hi" in row.index:
        return [v, encode(row[f"{column}_lo"]), encode(row[f"{column}_hi"])]
    return v


def primary_baseline(heads: pd.DataFrame, meta: dict) -> str | None:
    b = meta.get("primary_ablation")
    if b in BASELINES and f"ablation_{b}" in heads.columns:
        return b
    for b in ("resample", "mean", "zero"):
        col = f"ablation_{b}"
        if col in heads.columns and heads[col].notna().any():
            return b
    return None


def effect_column(heads: pd.DataFrame, meta: dict) -> str | None:
    """The column of the head's effect under the verdicts' (primary) baseline."""
    b = primary_baseline(heads, meta)
    return f"ablation_{b}" if b else None


def table_spec(df: pd.DataFrame, first: Sequence[str], effect: str | None = None) -> dict:
    """``{"columns": [...], "rows": [[...]]}``: an ``L·H`` id first, then ``first`` (those
    present), then every other column; a column with ``_lo``/``_hi`` becomes one column of
    ``[value, lo, hi]``; ``effect`` (the primary baseline's column) is shown as "effect"."""
    cols = [str(c) for c in df.columns]
    with_ci = set(ci_columns(cols))
    hidden = {f"{c}_{s}" for c in with_ci for s in ("lo", "hi")}
    rename = {effect: "effect"} if effect else {}
    shown = [c for c in cols if c not in hidden]
    names = [rename.get(c, c) for c in shown]
    order = [names.index(n) for n in first if n in names]
    order += [i for i in range(len(shown)) if i not in order]
    has_id = {"layer", "head"} <= set(cols)
    columns = (["L·H"] if has_id else []) + [names[i] for i in order]
    rows = []
    for _, row in df.iterrows():
        r: list[object] = [head_id(row["layer"], row["head"])] if has_id else []
        r += [cell(row, shown[i]) for i in order]
        rows.append(r)
    return {"columns": columns, "rows": rows}
