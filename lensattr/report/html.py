"""One offline, self-contained HTML page for an attention audit.

The first screen is static HTML (summary line, verdict grid, the heads that matter most). Head
cards and the sortable heads/edges tables are drawn in the browser, on demand, from one JSON
block, so a 270-head report stays small and fast. circuitsvis' ``RenderedHTML.local_src``
would inline its 1.3 MB bundle into every view (and ``str()`` loads it from a CDN), so the
bundle is inlined once and a card calls ``CircuitsVis.render(id, CircuitsVis.
AttentionPattern, props)`` when it opens. Nothing is fetched; every string is escaped (HTML
escaping in the static part, ``textContent`` in the script, ``\\u003c`` in the JSON).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from .assets import app_script, circuitsvis_bundle, script_json, stylesheet
from .cards import BASELINE_COLUMNS, make_card
from .data import EDGES_FIRST, HEADS_FIRST, effect_column, encode, primary_baseline, table_spec
from .grid import VERDICT_COLOURS, grid_html, summary_line, top_heads, top_heads_html
from .grid import verdict_chips as _chips

__all__ = ["render_report", "write_report", "circuitsvis_bundle"]

View = tuple[str, Sequence[str], Mapping[tuple[int, int], np.ndarray]]


def _meta_table(meta: Mapping) -> str:
    rows = []
    for key, value in meta.items():
        if isinstance(value, Mapping):
            cell = _meta_table(value)
        elif isinstance(value, list | tuple) and len(value) > 12:
            cell = html.escape(f"{len(value)} items: {str(value[:6])[:-1]}, …]")
        else:
            cell = html.escape(str(encode(value) if not isinstance(value, list | tuple)
                                   else value))
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{cell}</td></tr>")
    return f"<table class='meta'>{''.join(rows)}</table>"


def _pattern_data(name: str, tokens: Sequence[str], patterns: Mapping, keys: list) -> tuple:
    tokens = [str(t) for t in tokens]
    n = len(tokens)
    mats: list[list[list[int]] | None] = []  # per head: permille [query_pos][key_pos]
    causal = True
    for layer, head in keys:
        p = patterns.get((layer, head))
        if p is None:
            mats.append(None)
            continue
        a = np.nan_to_num(np.asarray(p, dtype=float), nan=0.0, posinf=0.0, neginf=0.0)
        if a.shape != (n, n):
            raise ValueError(f"patterns: {name!r} of L{layer}H{head} has shape {a.shape}, "
                             f"expected ({n}, {n}) [query_pos, key_pos] for its {n} tokens")
        causal &= not bool(np.any(np.triu(a, 1) > 1e-8))
        mats.append(np.rint(a * 1000).astype(int).tolist())  # permille: a compact page
    return {"name": name, "tokens": tokens, "causal": causal}, mats


def page_data(heads: pd.DataFrame, edges: pd.DataFrame | None, meta: Mapping,
              views: Sequence[View]) -> dict:
    """Everything the page's script draws from: cards, patterns per view, table specs."""
    meta = dict(meta)
    keys = [(int(r.layer), int(r.head)) for r in heads[["layer", "head"]].itertuples()]
    primary = primary_baseline(heads, meta)
    tokens0 = [str(t) for t in views[0][1]] if views else []
    groups = {}
    if edges is not None and len(edges) and {"layer", "head"} <= set(edges.columns):
        groups = {(int(k[0]), int(k[1])): g for k, g in edges.groupby(["layer", "head"])}
    cards = [make_card(row, groups.get(k), tokens0, primary)
             for k, (_, row) in zip(keys, heads.iterrows(), strict=True)]
    vs, pats = [], []
    for name, toks, patterns in views:
        v, mats = _pattern_data(name, toks, patterns, keys)
        vs.append(v)
        pats.append(mats)
    top = top_heads(heads, meta, n=1)
    # top[0][0] is a head id "L{layer}H{head}"
    default = (keys.index(cast("tuple[int, int]", tuple(int(x) for x in top[0][0][1:].split("H"))))
               if top else 0)
    edge_spec = None
    if edges is not None and len(edges):
        ed = edges
        if "verdict" in heads.columns and {"layer", "head"} <= set(edges.columns):
            v = heads[["layer", "head", "verdict"]]
            ed = edges.merge(v, on=["layer", "head"], how="left")
        edge_spec = table_spec(ed, EDGES_FIRST)
    return {
        "colours": VERDICT_COLOURS, "views": vs, "patterns": pats, "cards": cards,
        "default_card": default, "baseline_columns": BASELINE_COLUMNS,
        "heads": table_spec(heads, HEADS_FIRST, effect_column(heads, meta)), "edges": edge_spec,
    }


def render_report(
    heads: pd.DataFrame,
    patterns: Mapping[tuple[int, int], np.ndarray],
    tokens: Sequence[str],
    meta: Mapping,
    title: str = "lensattr audit",
    *,
    edges: pd.DataFrame | None = None,
    views: Sequence[View] = (),
    run: Mapping | None = None,
) -> str:
    """The full HTML document of an audit report (offline, self-contained).

    heads: one row per head, with at least ``layer`` and ``head``; a column X with
        ``X_lo``/``X_hi`` beside it is shown as "X [lo, hi]"; ``verdict`` and ``reason`` first.
    patterns: (layer, head) -> attention [query_pos, key_pos] on the example prompt whose
        token strings are ``tokens``. views: more (name, tokens, patterns) for the card's
        prompt picker (e.g. the mean over prompts). edges: the single-edge table (optional).
    meta: JSON-able metadata (folded away under "run details"). run: ``clean``/``corrupted``
        mean metric values for the one-line summary (optional).
    """
    if not {"layer", "head"} <= set(heads.columns):
        raise ValueError("heads: needs 'layer' and 'head' columns, got "
                         f"{list(heads.columns)[:8]}")
    all_views = [("example prompt 0", tokens, patterns), *views]
    data = page_data(heads, edges, meta, all_views)
    t = html.escape(title)
    prompt = "".join(f"<span class='tok'>{html.escape(str(tok))}</span>" for tok in tokens)
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{t}</title>"
        f"<meta name='viewport' content='width=device-width'><style>{stylesheet()}</style>"
        f"</head>\n<body><header class='top'><h1>{t}</h1>"
        f"<div class='oneline'>{summary_line(meta, heads, run)}</div>"
        f"<div class='chips'>{_chips(heads)}</div>"
        f"<details class='run'><summary>run details</summary><p>Example prompt: {prompt}</p>"
        f"{_meta_table(meta)}</details></header>\n<main>"
        f"<div class='first'><div>{grid_html(heads, meta)}</div><div class='top-heads'>"
        f"<h2>Heads that matter most</h2>{top_heads_html(heads, meta)}</div></div>\n"
        "<noscript><p>JavaScript is off: head cards and tables need it; the numbers are in "
        "heads.csv and edges.csv beside this report.</p></noscript>"
        "<section class='panel'><h2>Head card <span class='muted'>(click a cell of the grid)"
        "</span></h2><div id='card'></div></section>\n"
        f"<section class='panel'><h2>Heads ({len(heads)})</h2><div id='heads-table'></div>"
        "</section>\n<section class='panel'><details id='edges-details'><summary><h2 "
        f"style='display:inline'>Edges ({0 if edges is None else len(edges)})</h2></summary>"
        "<div id='edges-table'></div></details></section></main>\n"
        f"<script type='application/json' id='lensattr-data'>{script_json(data)}</script>\n"
        f"<script>{circuitsvis_bundle()}\n</script>\n<script>{app_script()}</script>\n"
        "</body></html>\n"
    )


def write_report(
    path: str | Path,
    heads: pd.DataFrame,
    patterns: Mapping[tuple[int, int], np.ndarray],
    tokens: Sequence[str],
    meta: Mapping,
    title: str = "lensattr audit",
    **kwargs,
) -> Path:
    """Write :func:`render_report` to ``path`` (UTF-8, parent folders created); keyword
    arguments (``edges``, ``views``, ``run``) go to :func:`render_report`."""
    out = Path(path)
    if out.exists() and out.is_dir():
        raise ValueError(f"path: {str(out)!r} is a folder; expected the report's file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(heads, patterns, tokens, meta, title, **kwargs),
                   encoding="utf-8")
    return out
