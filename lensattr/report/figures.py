"""Static figures for papers and notebooks (matplotlib, imported lazily: ``pip install
"lensattr[plot]"``). Each function returns one ``matplotlib.figure.Figure`` built without
pyplot (no global state, no display needed); :func:`plot_audit` backs ``Audit.plot``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data import effect_column, head_id
from .grid import VERDICT_COLOURS, VERDICT_LETTERS, short, top_heads

__all__ = ["verdict_grid", "claim_vs_effect", "head_heatmap", "position_heatmap", "token_map",
           "plot_audit", "write_figures", "KINDS", "save_figure"]

SUFFIXES = (".png", ".svg", ".pdf")


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("figures need matplotlib: pip install 'lensattr[plot]'") from err
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path``; the suffix (.png, .svg, .pdf) picks the format."""
    out = Path(path)
    if out.suffix.lower() not in SUFFIXES:
        raise ValueError(f"save: {str(out)!r} must end in one of {SUFFIXES}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    return out


def _grid_shape(heads: pd.DataFrame) -> tuple[int, int]:
    if not {"layer", "head"} <= set(heads.columns) or not len(heads):
        raise ValueError("heads: needs 'layer' and 'head' columns and at least one row")
    return int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1


def verdict_grid(heads: pd.DataFrame, meta: dict | None = None):
    """Layer × head cells coloured by verdict, each with its letter and primary effect."""
    from matplotlib.colors import to_rgb

    n_l, n_h = _grid_shape(heads)
    col = effect_column(heads, dict(meta or {}))
    rgb = np.ones((n_l, n_h, 3))
    fig = _figure(1.2 + 0.55 * n_h, 1.0 + 0.28 * n_l)
    ax = fig.add_subplot()
    small = n_l * n_h <= 400
    for _, r in heads.iterrows():
        v = str(r.get("verdict", ""))
        rgb[int(r["layer"]), int(r["head"])] = to_rgb(VERDICT_COLOURS.get(v, "#ffffff"))
    ax.imshow(rgb, aspect="auto", interpolation="nearest")
    if small:
        for _, r in heads.iterrows():
            v = str(r.get("verdict", ""))
            text = VERDICT_LETTERS.get(v, "?") + (f" {short(r[col])}" if col else "")
            ax.text(int(r["head"]), int(r["layer"]), text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(n_h), [f"H{h}" for h in range(n_h)], fontsize=7)
    ax.set_yticks(range(n_l), [f"L{la}" for la in range(n_l)], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"verdicts (number: {col or 'no effect column'})", fontsize=9)
    return fig


def claim_vs_effect(edges: pd.DataFrame, heads: Sequence[tuple[int, int]], ncols: int = 3):
    """Per head, one point per examined source: the attention it receives from the read rows
    (the claim) against the effect of removing that edge, with its 95% CI as an error bar."""
    need = {"layer", "head", "attention", "effect_remove"}
    if not need <= set(edges.columns):
        raise ValueError(f"edges: needs columns {sorted(need)}, has {list(edges.columns)[:10]}")
    heads = [(int(a), int(b)) for a, b in heads]
    if not heads:
        raise ValueError("heads: expected at least one (layer, head)")
    ncols = min(ncols, len(heads))
    nrows = math.ceil(len(heads) / ncols)
    fig = _figure(3.2 * ncols, 2.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (layer, head) in zip(axes, heads, strict=False):
        e = edges[(edges["layer"] == layer) & (edges["head"] == head)]
        x, y = e["attention"].to_numpy(float), e["effect_remove"].to_numpy(float)
        if {"effect_remove_lo", "effect_remove_hi"} <= set(e.columns):
            lo, hi = e["effect_remove_lo"].to_numpy(float), e["effect_remove_hi"].to_numpy(float)
            span = max(np.nanmax(np.abs(np.r_[y, 0.0][np.isfinite(np.r_[y, 0.0])])), 0.05)
            err = np.vstack([y - lo, hi - y])
            err[~np.isfinite(err)] = 4 * span  # an unbounded interval: drawn long, not infinite
            ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="o", ms=4, capsize=2, lw=0.8)
        else:
            ax.plot(x, y, "o", ms=4)
        top = np.nanmax(np.abs(np.r_[y, 0.0][np.isfinite(np.r_[y, 0.0])]))
        for xi, yi, name in zip(x, y, e.get("source_role", [""] * len(e)), strict=True):
            if xi >= 0.05 or abs(yi) >= 0.1 * top > 0:  # label the sources that stand out
                ax.annotate(str(name), (xi, yi), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        ax.axhline(0, color="#888", lw=0.6)
        lo_y, hi_y = ax.get_ylim()  # tiny effects are not magnified into a full axis
        ax.set_ylim(min(lo_y, -0.05), max(hi_y, 0.05))
        ax.set_xlim(-0.05, 1.05)
        ax.set_title(head_id(layer, head), fontsize=9)
        ax.set_xlabel("attention from the read rows (claim)", fontsize=7)
        ax.set_ylabel("effect of removing the edge", fontsize=7)
    for ax in axes[len(heads):]:
        ax.set_visible(False)
    return fig


def head_heatmap(heads: pd.DataFrame, column: str):
    """Any per-head number (an effect, a patching or AtP column) as a layer × head map."""
    if column not in heads.columns:
        raise ValueError(f"column: {column!r} is not a heads column; numeric ones: "
                         f"{[c for c in heads.columns if heads[c].dtype.kind == 'f'][:12]}")
    n_l, n_h = _grid_shape(heads)
    m = np.full((n_l, n_h), np.nan)
    vals = pd.to_numeric(heads[column], errors="coerce").to_numpy(float)
    m[heads["layer"].to_numpy(int), heads["head"].to_numpy(int)] = vals
    return _heatmap(m, f"{column} (layer × head)", "head", "layer",
                    [f"H{h}" for h in range(n_h)], [f"L{la}" for la in range(n_l)])


def _heatmap(m: np.ndarray, title: str, xlabel: str, ylabel: str, xt: list, yt: list):
    fig = _figure(1.6 + 0.45 * m.shape[1], 1.2 + 0.3 * m.shape[0])
    ax = fig.add_subplot()
    finite = np.abs(m[np.isfinite(m)])
    lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_xticks(range(m.shape[1]), xt, fontsize=7, rotation=90 if len(xt) > 12 else 0)
    ax.set_yticks(range(m.shape[0]), yt, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return fig


def position_heatmap(values, tokens: Sequence[str] | None = None, title: str = "patching"):
    """A [layer, pos] result (e.g. patching by position) as a layer × position map."""
    m = np.asarray(values, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"values: expected [layer, pos], got shape {m.shape}")
    xt = [f"{i} {t}" for i, t in enumerate(tokens)] if tokens else list(range(m.shape[1]))
    if tokens is not None and len(tokens) != m.shape[1]:
        raise ValueError(f"tokens: {len(tokens)} given for {m.shape[1]} positions")
    return _heatmap(m, f"{title} (layer × position)", "position", "layer", xt,
                    [f"L{la}" for la in range(m.shape[0])])


def token_map(data, tokens: Sequence[str], prompt: int = 0, title: str | None = None):
    """A [query_pos, key_pos] token map: a tensor/array, or a ``Rollout`` (its final layer) or
    ``Flow`` (rows normalised) from :mod:`lensattr.claims`, for prompt ``prompt``."""
    name = type(data).__name__
    if name == "Rollout":
        m, title = data.final[prompt], title or "attention rollout"
    elif name == "Flow":
        m, title = data.normalised()[prompt], title or "attention flow (rows normalised)"
    else:
        m, title = data, title or "token map"
    m = np.asarray(m.detach().cpu() if hasattr(m, "detach") else m, dtype=float)
    if m.ndim == 3:
        m = m[prompt]
    n = len(tokens)
    if m.shape != (n, n):
        raise ValueError(f"data: expected [query_pos, key_pos] = ({n}, {n}) for {n} tokens, "
                         f"got {m.shape}")
    fig = _figure(1.5 + 0.35 * n, 1.2 + 0.35 * n)
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0, aspect="equal", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8)
    labels = [f"{t!r}"[1:-1] for t in tokens]
    ax.set_xticks(range(n), labels, fontsize=7, rotation=90)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("input token (key)")
    ax.set_ylabel("output token (query)")
    ax.set_title(title, fontsize=9)
    return fig


def _scatter(audit, heads=None, **kw):
    if heads is None:
        heads = [tuple(int(x) for x in hid[1:].split("H")) for hid, _, _ in
                 top_heads(audit.heads, audit.meta, n=6)]
    return claim_vs_effect(audit.edges, heads, **kw)


def _heatmap_kind(audit, column=None):
    return head_heatmap(audit.heads, column or effect_column(audit.heads, audit.meta))


def _positions(audit, tensor=None, data=None, title=None):
    if data is None:
        if tensor not in audit.tensors:
            raise ValueError(f"tensor: pass the name of a [layer, pos] tensor of the audit "
                             f"({sorted(audit.tensors)}) or data=")
        data = audit.tensors[tensor]
    return position_heatmap(data, audit.meta.get("example_text_tokens"), title or tensor or "")


def _tokens(audit, data=None, tensor=None, prompt=0, title=None):
    if data is None:
        if tensor not in audit.tensors:
            raise ValueError("data: pass a Rollout, Flow or [query_pos, key_pos] array (or "
                             f"tensor= one of {sorted(audit.tensors)})")
        data = audit.tensors[tensor]
    return token_map(data, audit.meta.get("example_text_tokens") or [], prompt, title)


KINDS: dict[str, Callable[..., Any]] = {  # kind -> fn(audit, **kwargs) -> matplotlib Figure
    "grid": lambda a: verdict_grid(a.heads, a.meta),
    "scatter": _scatter,
    "heatmap": _heatmap_kind,
    "positions": _positions,
    "tokens": _tokens,
}


def plot_audit(audit, kind: str = "grid", *, save: str | Path | None = None, **kwargs):
    """Backs ``Audit.plot``: one Figure of ``kind`` (see :data:`KINDS`), saved if asked."""
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {sorted(KINDS)}")
    fig = KINDS[kind](audit, **kwargs)
    if save is not None:
        save_figure(fig, save)
    return fig


def write_figures(audit, folder: str | Path) -> list[Path]:
    """The verdict grid, the claim-vs-effect scatter of the top heads and the primary effect's
    layer × head map, each as PNG and SVG, into ``folder``."""
    out = []
    figs = {"verdict_grid": plot_audit(audit, "grid"), "effect_heatmap": plot_audit(audit,
                                                                                 "heatmap")}
    if len(audit.edges) and top_heads(audit.heads, audit.meta):
        figs["claim_vs_effect"] = plot_audit(audit, "scatter")
    for name, fig in figs.items():
        for suffix in (".png", ".svg"):
            out.append(save_figure(fig, Path(folder) / f"{name}{suffix}"))
    return out
