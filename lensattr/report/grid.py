"""The first screen, as static HTML: the one-line summary, the layer × head verdict grid (each
cell: verdict letter and effect, linking to the head's card) and the heads that matter most,
in words. Also used inline in notebooks (``Audit._repr_html_``); every string is escaped."""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Mapping

import pandas as pd

from .data import effect_column, encode, head_id, primary_baseline

__all__ = ["VERDICT_COLOURS", "VERDICT_LETTERS", "summary_line", "verdict_chips", "grid_html",
           "top_heads", "top_heads_html", "notebook_html", "short"]

VERDICT_COLOURS: dict[str, str] = {
    "faithful": "#a8e0b4",  # green
    "misleading": "#f2a3a3",  # red
    "through_sink": "#c9a6e8",  # violet: the effect travels through the sink's terms
    "compensated": "#f8c27a",  # orange
    "inert": "#bdbdbd",  # grey
    "negligible": "#e8e8e8",  # light grey
    "partial": "#fbe98a",  # yellow
    "undetermined": "#fbe98a",  # yellow
    "diffuse": "#cfe0f5",  # pale blue (claim-side flag)
}
VERDICT_LETTERS = {"faithful": "F", "misleading": "M", "through_sink": "S",
                   "compensated": "C", "inert": "I",
                   "negligible": "N", "partial": "P", "undetermined": "U", "diffuse": "D"}
_ORDER = ("faithful", "misleading", "through_sink", "partial", "compensated", "inert",
          "negligible", "undetermined")
e = html.escape


def _num(v: object) -> float:
    x = encode(v)
    if x == "inf":
        return math.inf
    if x == "-inf":
        return -math.inf
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else math.nan


def short(v: object) -> str:
    """An effect in at most ~4 characters for a grid cell: .25, −.03, 1.3, ∞, –."""
    x = _num(v)
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if abs(x) < 0.005:
        return "0"
    s = f"{x:.2f}" if abs(x) < 9.995 else f"{x:.0f}"
    if abs(x) < 1:
        s = s.replace("0.", ".", 1)
    return s.replace("-", "−")


def _ci(row: pd.Series, col: str) -> str:
    v = _num(row.get(col))
    if math.isnan(v):
        return "–"
    lo, hi = _num(row.get(f"{col}_lo")), _num(row.get(f"{col}_hi"))
    if math.isnan(lo) and math.isnan(hi):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def summary_line(meta: Mapping, heads: pd.DataFrame, run: Mapping | None = None) -> str:
    """Model, task, metric, prompt count, clean → corrupted gap and baseline, as HTML."""
    metric = meta.get("metric")
    if isinstance(metric, Mapping):
        m = str(metric.get("name", "?")) + (f" at {metric['position']}"
                                            if metric.get("position") else "")
    else:
        m = str(metric) if metric is not None else "?"
    parts = [f"<b>{e(str(meta.get('model', '?')))}</b>",
             f"task <b>{e(str(meta.get('task', '?')))}</b>",
             f"metric <b>{e(m)}</b>", f"<b>{e(str(meta.get('n_prompts', '?')))}</b> prompts"]
    run = run or {}
    clean, corr = _num(run.get("clean")), _num(run.get("corrupted"))
    scale = max(abs(clean), abs(corr)) if not (math.isnan(clean) or math.isnan(corr)) else 0
    clean, corr = (0.0 if abs(x) < 1e-6 * scale else x for x in (clean, corr))
    if not math.isnan(clean) and not math.isnan(corr):
        parts.append(f"clean {clean:.3g} → corrupted {corr:.3g} (gap {corr - clean:+.3g})")
    elif not math.isnan(clean):
        parts.append(f"clean {clean:.3g}")
    b = primary_baseline(heads, dict(meta))
    if b:
        parts.append(f"effects under <b>{e(b)}</b> ablation")
    parts.append(f"{len(heads)} heads")
    return " · ".join(parts)


def verdict_chips(heads: pd.DataFrame) -> str:
    if "verdict" not in heads.columns:
        return ""
    counts = Counter(str(v) for v in heads["verdict"])
    keys = sorted(counts, key=lambda k: (_ORDER.index(k) if k in _ORDER else 99, k))
    return "".join(
        f"<span class='chip' style='background:{VERDICT_COLOURS.get(k, '#fff')}'>"
        f"{e(k)} {counts[k]}</span>" for k in keys)


def grid_html(heads: pd.DataFrame, meta: Mapping, links: bool = True) -> str:
    """One cell per head: verdict letter + effect under the primary baseline, coloured by
    verdict; cells link to ``#L{layer}H{head}`` (the head's card)."""
    col = effect_column(heads, dict(meta))
    layers = sorted({int(x) for x in heads["layer"]})
    n_heads = max((int(x) for x in heads["head"]), default=-1) + 1
    by = {(int(r["layer"]), int(r["head"])): r for _, r in heads.iterrows()}
    top = "".join(f"<th>H{h}</th>" for h in range(n_heads))
    rows = [f"<tr><th></th>{top}</tr>"]
    for layer in layers:
        cells = [f"<th>L{layer}</th>"]
        for h in range(n_heads):
            r = by.get((layer, h))
            if r is None:
                cells.append("<td></td>")
                continue
            verdict = str(r.get("verdict", ""))
            hid = head_id(layer, h)
            letter = VERDICT_LETTERS.get(verdict, "?")
            tip = f"{hid} {verdict} · effect {_ci(r, col) if col else '–'}"
            inner = f"<b>{letter}</b>{short(r.get(col)) if col else ''}"
            inner = f"<a href='#{hid}'>{inner}</a>" if links else f"<span>{inner}</span>"
            cells.append(f"<td id='cell-{hid}' class='v' data-verdict='{e(verdict)}' "
                         f"style='background:{VERDICT_COLOURS.get(verdict, '#fff')}' "
                         f"title='{e(tip)}'>{inner}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    legend = " · ".join(f"<b>{VERDICT_LETTERS[k]}</b> {k}" for k in _ORDER)
    what = f"effect = {col}" if col else "no effect column"
    return (f"<div class='gridwrap'><table class='grid' aria-label='verdict grid'>"
            f"{''.join(rows)}</table></div><div class='legend'>{legend}. Number: {e(what)} "
            "(0 = no change, 1 = as far as the corrupted run).</div>")


def _words(r: pd.Series, col: str | None) -> str:
    v = str(r.get("verdict", ""))
    eff = _ci(r, col) if col else "–"
    rho = _ci(r, "routing") if "routing" in r.index else "–"
    partner = str(r.get("partner") or "")
    carriers = str(r.get("carriers") or "")
    claim = str(r.get("top_source") or "")
    if v == "faithful":
        return f"matters (effect {eff}) and acts through what its attention claims (ρ {rho})"
    if v == "misleading":
        c = f"; the effect is carried by {carriers}" if carriers else ""
        return (f"matters (effect {eff}) but not through what its attention claims"
                f"{' (' + claim + ')' if claim else ''}{c}")
    if v == "partial":
        return f"matters (effect {eff}); its claimed sources carry part of it (ρ {rho})"
    if v == "through_sink":
        sink = _ci(r, "sink_share") if "sink_share" in r.index else "–"
        return (f"matters (effect {eff}), but through its attention to the sink (BOS): the "
                f"sink's terms carry {sink} of it, its claimed sources ρ {rho}")
    if v == "compensated":
        if partner:
            return (f"looks unimportant alone (effect {eff}) because {partner} takes over; "
                    f"together: {_ci(r, 'joint_effect')}")
        return f"looks unimportant alone (effect {eff}): its direct effect is cancelled downstream"
    if v == "inert":
        return f"a striking pattern that does nothing for this metric (effect {eff})"
    if v == "negligible":
        return f"no effect (effect {eff}) and no striking pattern"
    return f"not settled (effect {eff}): {r.get('reason', '')}"


def top_heads(heads: pd.DataFrame, meta: Mapping, n: int = 8) -> list[tuple[str, str, str]]:
    """The heads that matter most: (id, verdict, verdict in words), largest |effect| first
    among relevant or compensated heads (compensated ranked by their joint effect); if none,
    the largest |effect| heads."""
    col = effect_column(heads, dict(meta))
    if col is None or not len(heads):
        return []
    size = heads[col].map(_num).abs()
    if "joint_effect" in heads.columns:
        comp = heads.get("verdict", pd.Series("", index=heads.index)) == "compensated"
        size = size.where(~comp, heads["joint_effect"].map(_num).abs())
    matters = heads.get("verdict", pd.Series("", index=heads.index)).isin(
        ["faithful", "misleading", "through_sink", "partial", "compensated"])
    if "relevance" in heads.columns:
        matters |= heads["relevance"] == "relevant"
    pick = heads[matters] if matters.any() else heads
    order = size[pick.index].replace(math.inf, 1e300).fillna(-1).sort_values(ascending=False)
    out = []
    for i in order.index[:n]:
        r = heads.loc[i]
        out.append((head_id(r["layer"], r["head"]), str(r.get("verdict", "")), _words(r, col)))
    return out


def top_heads_html(heads: pd.DataFrame, meta: Mapping, links: bool = True) -> str:
    items = top_heads(heads, meta)
    if not items:
        return "<p>No head effects recorded.</p>"
    lis = []
    for hid, verdict, words in items:
        name = f"<a href='#{hid}'>{hid}</a>" if links else f"<b>{hid}</b>"
        lis.append(f"<li>{name} <span class='pill' style='background:"
                   f"{VERDICT_COLOURS.get(verdict, '#fff')}'>{e(verdict)}</span> {e(words)}</li>")
    return f"<ol>{''.join(lis)}</ol>"


_NB_CSS = ("<style>.lensattr-nb table.grid{border-collapse:separate;border-spacing:2px;"
           "font-size:11px}.lensattr-nb table.grid td{padding:1px 3px;text-align:center;"
           "min-width:36px;border-radius:3px;color:#111}.lensattr-nb table.grid th{"
           "font-weight:500;color:#666;background:none}.lensattr-nb .chip{padding:0 5px;"
           "margin-right:4px;border-radius:3px}.lensattr-nb .legend{font-size:11px;"
           "color:#555}</style>")


def notebook_html(heads: pd.DataFrame, meta: Mapping, run: Mapping | None = None) -> str:
    """Summary line, verdict counts and the grid, without script (for ``_repr_html_``)."""
    return (f"{_NB_CSS}<div class='lensattr-nb'><div>{summary_line(meta, heads, run)}</div>"
            f"<div>{verdict_chips(heads)}</div>{grid_html(heads, meta, links=False)}</div>")
