"""Views of an audit for Jupyter notebooks, offline: the verdict grid, and one head's attention
pattern (circuitsvis' ``AttentionPattern``) with its claimed sources marked and the evidence
beside it.

A :class:`NotebookView` has ``.html`` (its own HTML, referencing ``window.CircuitsVis``),
``_repr_html_()`` (what Jupyter shows) and ``save(path)`` (a standalone offline page).
circuitsvis' bundle (1.3 MB, defines ``window.CircuitsVis``) is inlined once per process: the
first head view displayed carries it, later ones only wait for it (polling for a few seconds)
and render into their own element; if it never appears (outputs cleared, a front end that
isolates outputs), the view says to call :func:`resend_bundle`. In Google Colab, which gives
each output its own frame, every head view carries the bundle. Nothing is fetched (no CDN:
circuitsvis' own ``RenderedHTML`` loads from unpkg); every token string is escaped.
"""

from __future__ import annotations

import html
import itertools
import math
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .assets import circuitsvis_bundle, script_json
from .grid import VERDICT_COLOURS, notebook_html

__all__ = ["NotebookView", "Source", "CLAIMED_AT", "grid_view", "head_view", "resend_bundle",
           "bundle_html", "WAIT_MS"]

CLAIMED_AT = 0.5  # a source is claimed when its claimed_share (share of prompts) is >= this
WAIT_MS = 5000  # how long a view waits for window.CircuitsVis before saying how to get it
_SENT = {"bundle": False}  # whether this process has already displayed the bundle
_SERIAL = itertools.count(1)
e = html.escape
Evidence = Sequence[tuple[str, str, object]]  # (key, label, str | (value, lo, hi))


def resend_bundle() -> None:
    """Put circuitsvis' bundle into the next head view displayed (e.g. after clearing the
    output that held it, or in a front end that gives each output its own frame)."""
    _SENT["bundle"] = False


def _isolated_outputs() -> bool:
    """True in a front end that renders each output in its own frame (Google Colab), where a
    bundle shown once is not seen by later outputs: there every head view carries it."""
    return "google.colab" in sys.modules


def bundle_html() -> str:
    """The ``<script>`` defining ``window.CircuitsVis`` (no source-map comment: nothing to
    fetch, not even with developer tools open)."""
    js = re.sub(r"^//# sourceMappingURL=.*$", "", circuitsvis_bundle(), flags=re.MULTILINE)
    return (f"<script data-lensattr-bundle='circuitsvis'>{js}\n;if(typeof CircuitsVis!=="
            "'undefined'){window.CircuitsVis=CircuitsVis;}</script>")


def _uid() -> str:
    return f"lensattr-{next(_SERIAL)}-{secrets.token_hex(4)}"


class NotebookView:
    """A view for a notebook. ``html``: this view's HTML (element id ``uid``); it holds no
    bundle. ``_repr_html_()``: the same with a fresh id (one view shown twice on a page does
    not collide), prefixed with circuitsvis' bundle the first time a view that needs it is
    shown in this process. ``save(path)``: a standalone offline page (bundle included when
    the view draws a pattern). Head views also keep ``pattern`` ([query, key] as shown),
    ``tokens``, ``claimed`` (names of the marked sources), ``head`` and ``prompt``."""

    def __init__(self, render: Callable[[str], str], title: str, needs_bundle: bool, *,
                 head: tuple[int, int] | None = None, prompt: int | str | None = None,
                 pattern: np.ndarray | None = None, tokens: Sequence[str] = (),
                 claimed: Sequence[str] = ()):
        self._render = render
        self.title, self.needs_bundle = title, needs_bundle
        self.head, self.prompt, self.pattern = head, prompt, pattern
        self.tokens, self.claimed = list(tokens), list(claimed)
        self.uid = _uid()
        self.html = render(self.uid)

    def __repr__(self) -> str:
        return f"NotebookView({self.title!r})"

    def _repr_html_(self) -> str:
        body = self._render(_uid())
        if self.needs_bundle and (not _SENT["bundle"] or _isolated_outputs()):
            _SENT["bundle"] = True
            return bundle_html() + body
        return body

    def save(self, path: str | Path) -> Path:
        """Write a standalone, offline HTML page of this view (UTF-8; parents created)."""
        out = Path(path)
        if out.exists() and out.is_dir():
            raise ValueError(f"path: {str(out)!r} is a folder; expected the page's file name")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>"
            f"{e(self.title)}</title></head><body>{bundle_html() if self.needs_bundle else ''}"
            f"{self.html}</body></html>\n", encoding="utf-8")
        return out


def grid_view(heads: pd.DataFrame, meta: dict, run: dict | None = None) -> NotebookView:
    """The one-line summary, verdict counts and the verdict grid (no script)."""
    inner = notebook_html(heads, meta, run)
    return NotebookView(lambda uid: f"<div class='lensattr-view lensattr-grid' id='{uid}'>"
                                    f"{inner}</div>", "lensattr audit: verdict grid", False)


@dataclass(frozen=True)
class Source:
    """One examined source of the head's read row (a row of the edges table), placed on the
    shown prompt. ``pos``: its index among the shown tokens (None: it could not be placed on
    this prompt). Numbers from the edges table (over prompts); ``here``: the attention it
    gets on the shown prompt at the read row (None when there is no single read row)."""

    name: str
    pos: int | None
    attention: float
    norm_attention: float
    effect: tuple[float, float, float]
    claimed_share: float
    is_sink: bool = False
    here: float | None = None

    @property
    def claimed(self) -> bool:
        """In the claimed set: ``claimed_share >= CLAIMED_AT`` (0.5), i.e. in the claimed set
        (fewest non-sink sources covering half the row's non-sink mass) of at least half the
        prompts."""
        return math.isfinite(self.claimed_share) and self.claimed_share >= CLAIMED_AT


def _float(v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _f(v: object) -> str:
    x = _float(v)
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.3g}" if x != 0 and abs(x) < 1e-3 else f"{x:.3f}"


def _value_cell(v: object) -> str:
    """A table cell; numbers carry ``data-value`` (and ``data-lo``/``data-hi``) as Python
    float reprs (``nan`` where missing), text carries ``data-value`` = the text."""
    if isinstance(v, tuple):
        x, lo, hi = (_float(b) for b in v)
        text = _f(x) if all(_f(b) == "–" for b in (lo, hi)) else f"{_f(x)} [{_f(lo)}, {_f(hi)}]"
        return (f"<td class='num' data-value='{x!r}' data-lo='{lo!r}' data-hi='{hi!r}'>"
                f"{e(text)}</td>")
    return f"<td data-value='{e(str(v))}'>{e(str(v)) or '–'}</td>"


_CSS = (
    "<style>.lensattr-head{font:13px/1.4 system-ui,sans-serif;color:#111;margin:6px 0}"
    ".lensattr-head .lensattr-cols{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}"
    ".lensattr-head .lensattr-pattern{width:380px;max-width:100%;min-height:60px}"
    ".lensattr-head .lensattr-ev{flex:1;min-width:300px;max-width:640px}"
    ".lensattr-head table{border-collapse:collapse;font-size:12px}"
    ".lensattr-head td,.lensattr-head th{padding:1px 6px;text-align:left;vertical-align:top}"
    ".lensattr-head td.num{font-variant-numeric:tabular-nums;white-space:nowrap}"
    ".lensattr-head .lensattr-pill{padding:0 6px;border-radius:3px}"
    ".lensattr-head .lensattr-strip{margin:6px 0;line-height:2}"
    ".lensattr-head .lensattr-tok{border:1px solid #ddd;border-radius:3px;padding:1px 3px;"
    "margin-right:2px;white-space:pre;background:#fafafa}"
    ".lensattr-head .lensattr-tok.src{border-color:#888}"
    ".lensattr-head .claimed{background:#fde2c8;border-color:#d35400;font-weight:600}"
    ".lensattr-head .lensattr-mark{color:#d35400}"
    ".lensattr-head .lensattr-note,.lensattr-head .muted{color:#666}</style>")


def _strip(tokens: Sequence[str], sources: Sequence[Source]) -> str:
    by_pos = {s.pos: s for s in sources if s.pos is not None}
    spans = []
    for i, tok in enumerate(tokens):
        s = by_pos.get(i)
        if s is None:
            spans.append(f"<span class='lensattr-tok' data-pos='{i}'>{e(tok)}</span>")
            continue
        cls = "lensattr-tok src" + (" claimed" if s.claimed else "")
        tip = (f"{s.name}: attention {_f(s.attention)}, norm-based {_f(s.norm_attention)}, "
               f"effect of removing the edge {_f(s.effect[0])}"
               + (" (claimed)" if s.claimed else ""))
        mark = "<span class='lensattr-mark' aria-label='claimed'>★</span>" if s.claimed else ""
        spans.append(f"<span class='{cls}' data-pos='{i}' data-source='{e(s.name)}' "
                     f"title='{e(tip)}'>{mark}{e(tok)}</span>")
    return f"<div class='lensattr-strip' aria-label='prompt tokens'>{''.join(spans)}</div>"


def _sources_table(tokens: Sequence[str], sources: Sequence[Source]) -> str:
    rows = ["<tr><th></th><th>source</th><th>token</th><th>attention</th><th>norm-based</th>"
            "<th>effect of removing the edge [CI]</th><th>claimed share</th><th>here</th></tr>"]
    for s in sources:
        tok = e(tokens[s.pos]) if s.pos is not None else "<i>not on this prompt</i>"
        cls = "lensattr-src claimed" if s.claimed else "lensattr-src"
        pos = "" if s.pos is None else f" data-pos='{s.pos}'"
        rows.append(
            f"<tr class='{cls}' data-source='{e(s.name)}'{pos}>"
            f"<td class='lensattr-mark'>{'★' if s.claimed else ''}</td>"
            f"<td>{e(s.name)}{' (sink)' if s.is_sink else ''}</td><td>{tok}</td>"
            f"{_value_cell((s.attention, math.nan, math.nan))}"
            f"{_value_cell((s.norm_attention, math.nan, math.nan))}{_value_cell(s.effect)}"
            f"{_value_cell((s.claimed_share, math.nan, math.nan))}"
            f"{_value_cell((math.nan if s.here is None else s.here, math.nan, math.nan))}</tr>")
    return (f"<table class='lensattr-sources'>{''.join(rows)}</table><div class='muted'>"
            f"★ claimed: in the claimed set of at least {CLAIMED_AT:.0%} of the prompts "
            "(claimed share ≥ 0.5). Attention, norm-based and effect: over prompts, at the read "
            "row; here: this prompt's attention at the read row.</div>")


_SCRIPT = """<script>(function () {
  var id = "%(uid)s", waited = 0;
  function draw() {
    var host = document.getElementById(id + "-pattern");
    if (!host || host.getAttribute("data-state") === "drawn") return;
    var cv = window.CircuitsVis;
    if (cv && cv.render && cv.AttentionPattern) {
      var props = JSON.parse(document.getElementById(id + "-props").textContent);
      host.textContent = "";
      host.setAttribute("data-state", "drawn");
      cv.render(id + "-pattern", cv.AttentionPattern, props);
      return;
    }
    if (waited >= %(wait)d) {
      host.textContent = %(msg)s;
      host.setAttribute("data-state", "missing");
      return;
    }
    waited += 100;
    setTimeout(draw, 100);
  }
  draw();
})();</script>"""
_MISSING = ("circuitsvis is not loaded on this page (its bundle is inlined once per kernel, in "
            "the first head view shown). Run lensattr.report.notebook.resend_bundle() and show "
            "this view again, or save it with view.save('head.html').")


def _props(pattern: np.ndarray, tokens: Sequence[str], sources: Sequence[Source]) -> dict:
    claimed = {s.pos for s in sources if s.claimed and s.pos is not None}
    labels = [("★" + t if i in claimed else t) for i, t in enumerate(tokens)]
    a = np.nan_to_num(pattern.astype(float), nan=0.0, posinf=0.0, neginf=0.0)
    causal = not bool(np.any(np.triu(a, 1) > 1e-8))
    return {"tokens": labels, "attention": np.round(a, 6).tolist(), "maskUpperTri": causal}


def head_view(head: tuple[int, int], pattern: np.ndarray, tokens: Sequence[str],
              evidence: Evidence, sources: Sequence[Source], *, prompt: int | str,
              prompt_label: str, verdict: str = "", sentence: str = "",
              note: str = "") -> NotebookView:
    """One head: its attention ``pattern`` ([query, key], over ``tokens``) drawn by circuitsvis,
    the token strip and sources table with the claimed ones marked (class ``claimed``, ★),
    and the ``evidence`` rows ((key, label, text or (value, lo, hi))) beside it."""
    tokens = [str(t) for t in tokens]
    n = len(tokens)
    pattern = np.asarray(pattern, dtype=float)
    if pattern.shape != (n, n):
        raise ValueError(f"pattern: shape {pattern.shape}, expected ({n}, {n}) [query, key] "
                         f"for its {n} tokens")
    bad = [s.name for s in sources if s.pos is not None and not 0 <= s.pos < n]
    if bad:
        raise ValueError(f"sources: {bad} lie outside the {n} tokens")
    layer, h = head
    hid = f"L{int(layer)}H{int(h)}"
    props = script_json(_props(pattern, tokens, sources))
    ev = "".join(f"<tr data-key='{e(k)}'><th>{e(label)}</th>{_value_cell(v)}</tr>"
                 for k, label, v in evidence)
    pill = (f"<span class='lensattr-pill lensattr-verdict' data-verdict='{e(verdict)}' style="
            f"'background:{VERDICT_COLOURS.get(verdict, '#eee')}'>{e(verdict or '–')}</span>")
    note_html = f"<p class='lensattr-note'>{e(note)}</p>" if note else ""
    claimed = [s.name for s in sources if s.claimed]

    def render(uid: str) -> str:
        return (
            f"{_CSS}<div class='lensattr-view lensattr-head' id='{uid}' data-head='{hid}' "
            f"data-prompt='{e(str(prompt))}'><div><b>{hid}</b> {pill} <span class='muted'>"
            f"attention on {e(prompt_label)}</span></div><div class='lensattr-cols'><div>"
            f"<div class='lensattr-pattern' id='{uid}-pattern'><span class='muted'>attention "
            "pattern: drawn by circuitsvis (needs JavaScript: a trusted notebook)</span></div>"
            f"{_strip(tokens, sources)}{note_html}</div><div class='lensattr-ev'>"
            f"<p class='lensattr-sentence'>{e(sentence)}</p><table class='lensattr-evidence'>"
            f"{ev}</table>{_sources_table(tokens, sources)}</div></div>"
            f"<script type='application/json' id='{uid}-props'>{props}</script>"
            f"{_SCRIPT % {'uid': uid, 'wait': WAIT_MS, 'msg': script_json(_MISSING)}}</div>")

    return NotebookView(render, f"lensattr: {hid} on {prompt_label}", True, head=(layer, h),
                        prompt=prompt, pattern=pattern, tokens=tokens, claimed=claimed)
