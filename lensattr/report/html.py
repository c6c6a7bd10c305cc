"""One offline, self-contained HTML page for an attention audit.

The page holds the audit's metadata, a verdict summary, the per-head table and,
for each head, its attention pattern on one example prompt drawn by circuitsvis'
``AttentionPattern``. circuitsvis' own ``RenderedHTML.local_src`` inlines its
1.3 MB JavaScript bundle into every view (and ``str()`` loads it from a CDN), so
we inline the bundle once and call ``CircuitsVis.render(id, CircuitsVis.
AttentionPattern, props)`` per head. Each view's container first holds a static
SVG heatmap, which React replaces when JavaScript runs. Nothing is fetched.
"""

from __future__ import annotations

import html
import importlib.util
import json
import numbers
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

MISSING = "–"  # shown for NaN / None / "not computed"

VERDICT_COLOURS: dict[str, str] = {
    "faithful": "#a8e0b4",  # green
    "misleading": "#f2a3a3",  # red
    "compensated": "#f8c27a",  # orange
    "inert": "#bdbdbd",  # grey
    "negligible": "#e8e8e8",  # light grey
    "partial": "#fbe98a",  # yellow
    "undetermined": "#fbe98a",  # yellow
    "diffuse": "#cfe0f5",  # pale blue (claim-side flag)
}

_META_FIRST = ("model", "task", "metric", "n_prompts", "versions")

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}section.head{border-top:1px solid #ddd;margin-top:1em}
.fallback{font-size:12px;color:#555}.view{max-width:640px}h3 small{color:#666;font-weight:normal}
.tok{border:1px solid #ddd;margin:1px;padding:0 2px;white-space:pre;font-family:monospace}
"""


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis' browser bundle (defines the global ``CircuitsVis``), safe to inline.

    Found through the import system without importing circuitsvis (which imports torch).
    ``</script`` inside the bundle (it occurs in a JS string literal) is written as
    ``<\\/script``, the same string in JavaScript, so it cannot close our tag.
    """
    spec = importlib.util.find_spec("circuitsvis")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("circuitsvis is not installed; it is needed for the HTML report")
    path = Path(next(iter(spec.submodule_search_locations))) / "dist" / "cdn" / "iife.js"
    js = path.read_text(encoding="utf-8")
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


def _js(obj: object) -> str:
    """JSON for inside a <script> element: no ``<``, ``>`` or ``&`` can break out."""
    text = json.dumps(obj, allow_nan=False)  # ensure_ascii also escapes U+2028/U+2029
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.api.types.is_scalar(value) and pd.isna(value))
    except (TypeError, ValueError):
        return False


def _fmt(value: object) -> str:
    """Plain text of one value: floats to 3 decimals, NaN/None as ``MISSING``."""
    if _is_missing(value):
        return MISSING
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.3f}"
    if isinstance(value, list | tuple | set | np.ndarray):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _verdict_td(value: object) -> str:
    text = _fmt(value)
    colour = VERDICT_COLOURS.get(text.strip().lower())
    style = f' style="background:{colour}"' if colour else ""
    return f"<td{style}>{html.escape(text)}</td>"


def _meta_table(meta: Mapping) -> str:
    keys = [k for k in _META_FIRST if k in meta] + [k for k in meta if k not in _META_FIRST]
    rows = []
    for key in keys:
        value = meta[key]
        cell = _meta_table(value) if isinstance(value, Mapping) else html.escape(_fmt(value))
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{cell}</td></tr>")
    return f"<table class='meta'>{''.join(rows)}</table>"


def _summary_table(heads: pd.DataFrame) -> str:
    if "verdict" not in heads.columns:
        return "<p>No verdict column.</p>"
    counts = Counter(_fmt(v) for v in heads["verdict"])
    rows = [
        f"<tr>{_verdict_td(verdict)}<td class='num'>{n}</td></tr>"
        for verdict, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    return f"<table class='summary'><tr><th>verdict</th><th>heads</th></tr>{''.join(rows)}</table>"


def _ci_columns(columns: Sequence[str]) -> set[str]:
    """Columns X that have both ``X_lo`` and ``X_hi`` beside them."""
    present = set(columns)
    return {c for c in columns if f"{c}_lo" in present and f"{c}_hi" in present}


def _heads_table(heads: pd.DataFrame, anchors: list[str | None]) -> str:
    columns = [str(c) for c in heads.columns]
    with_ci = _ci_columns(columns)
    hidden = {f"{c}_{s}" for c in with_ci for s in ("lo", "hi")}
    shown = [c for c in columns if c not in hidden]
    header = "".join(f"<th>{html.escape(c)}{' [CI]' if c in with_ci else ''}</th>" for c in shown)
    body = []
    for anchor, (_, row) in zip(anchors, heads.iterrows(), strict=True):
        cells = []
        for col in shown:
            value = row[col]
            if col == "verdict":
                cells.append(_verdict_td(value))
                continue
            text = _fmt(value)
            if col in with_ci and text != MISSING:
                lo, hi = row[f"{col}_lo"], row[f"{col}_hi"]
                if not (_is_missing(lo) and _is_missing(hi)):
                    text = f"{text} [{_fmt(lo)}, {_fmt(hi)}]"
            cell = html.escape(text)
            if col == "head" and anchor:
                cell = f"<a href='#{anchor}'>{cell}</a>"
            cls = " class='num'" if isinstance(value, numbers.Number) else ""
            cells.append(f"<td{cls}>{cell}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<div class='scroll'><table><tr>{header}</tr>{''.join(body)}</table></div>"


def _svg_heatmap(pattern: np.ndarray, tokens: Sequence[str]) -> str:
    """Static fallback: one rect per (query, key) with attention ≥ 0.005, darker = more."""
    n = len(tokens)
    cell = max(3, min(14, 320 // max(n, 1)))
    rects = []
    for q, k in zip(*np.nonzero(pattern >= 0.005), strict=True):
        v = float(pattern[q, k])
        tip = html.escape(f"{tokens[q]} ({q}) → {tokens[k]} ({k}): {v:.3f}")
        rects.append(
            f"<rect x='{k * cell}' y='{q * cell}' width='{cell}' height='{cell}' "
            f"fill='#1f4e9c' fill-opacity='{min(v, 1.0):.3f}'><title>{tip}</title></rect>"
        )
    size = n * cell
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{size}' height='{size}' "
        f"style='border:1px solid #999;background:#fff'>{''.join(rects)}</svg>"
    )


def _head_section(
    idx: int, layer: int, head: int, pattern: object, tokens: list[str], note: str
) -> str:
    div_id = f"lensattr-head-{idx}"
    title = f"<h3 id='sec-{idx}'>L{layer}H{head} <small>{html.escape(note)}</small></h3>"
    if pattern is None:
        return f"<section class='head'>{title}<p>No attention pattern recorded.</p></section>"
    a = np.nan_to_num(np.asarray(pattern, dtype=float), nan=0.0, posinf=0.0, neginf=0.0)
    if a.shape != (len(tokens), len(tokens)):
        raise ValueError(
            f"pattern of L{layer}H{head} has shape {a.shape}, expected "
            f"({len(tokens)}, {len(tokens)}) [query_pos, key_pos]"
        )
    causal = not bool(np.any(np.triu(a, 1) > 1e-8))
    props = {"tokens": tokens, "attention": np.round(a, 4).tolist(), "maskUpperTri": causal}
    fallback = (
        f"<div class='fallback'>{_svg_heatmap(a, tokens)}<br>Static view (JavaScript off): "
        "row = query, column = key; darker = more attention.</div>"
    )
    script = (
        f"<script>if (window.CircuitsVis) CircuitsVis.render({_js(div_id)}, "
        f"CircuitsVis.AttentionPattern, {_js(props)});</script>"
    )
    view = f"<div id='{div_id}' class='view'>{fallback}</div>"
    return f"<section class='head'>{title}{view}{script}</section>"


def render_report(
    heads: pd.DataFrame,
    patterns: Mapping[tuple[int, int], np.ndarray],
    tokens: Sequence[str],
    meta: Mapping,
    title: str = "lensattr audit",
) -> str:
    """The full HTML document of an audit report (offline, self-contained).

    heads: one row per head, with at least ``layer`` and ``head``; every column is
        shown; a column X with ``X_lo``/``X_hi`` beside it is shown as "X [lo, hi]".
    patterns: (layer, head) -> attention [query_pos, key_pos] of one example prompt.
    tokens: that prompt's token strings. meta: JSON-able metadata, shown as a table.
    """
    tokens = [str(t) for t in tokens]
    keys = [(int(r.layer), int(r.head)) for r in heads[["layer", "head"]].itertuples()]
    cols = [c for c in ("head_type", "verdict") if c in heads.columns]
    notes = dict(zip(keys, (" · ".join(map(_fmt, r)) for r in heads[cols].values), strict=True))
    if {"baseline_sensitive", "labels_by_baseline"} <= set(heads.columns):
        for k, flag, by in zip(keys, heads["baseline_sensitive"], heads["labels_by_baseline"],
                               strict=True):
            if bool(flag):  # a head whose label changes with the ablation baseline
                notes[k] += f" · ⚠ label changes with the baseline ({_fmt(by)})"
    in_table = set(keys)
    extra = sorted(k for k in ((int(a), int(b)) for a, b in patterns) if k not in in_table)
    order = list(dict.fromkeys(keys + extra))  # table heads first, then any other pattern
    position = {k: i for i, k in enumerate(order)}
    sections = [
        _head_section(i, *key, patterns.get(key), tokens, notes.get(key, ""))
        for i, key in enumerate(order)
    ]
    anchors = [f"sec-{position[k]}" for k in keys]
    t = html.escape(title)
    prompt = "".join(f"<span class='tok'>{html.escape(tok)}</span>" for tok in tokens)
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{t}</title>"
        f"<style>{_CSS}</style>\n<script>{circuitsvis_bundle()}\n</script></head>\n<body>"
        f"<h1>{t}</h1><h2>Run</h2>{_meta_table(meta)}<h2>Verdicts</h2>{_summary_table(heads)}"
        f"<h2>Heads ({len(heads)})</h2>{_heads_table(heads, anchors)}\n"
        f"<h2>Attention patterns</h2><p>Example prompt: {prompt}</p>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def write_report(
    path: str | Path,
    heads: pd.DataFrame,
    patterns: Mapping[tuple[int, int], np.ndarray],
    tokens: Sequence[str],
    meta: Mapping,
    title: str = "lensattr audit",
) -> Path:
    """Write :func:`render_report` to ``path`` (UTF-8, parent folders created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(heads, patterns, tokens, meta, title), encoding="utf-8")
    return out
