"""The :class:`Audit` result: tidy tables, tensors with documented axes, and metadata.

Saved as a folder: ``heads.csv``, ``edges.csv``, ``tokens.csv``, ``tensors.safetensors``,
``verdicts.json`` (the verdict records, tied to ``heads.csv`` by its sha256; see ``records``) and
``audit.json`` (meta, column dtypes, row counts, tensor shapes, each file's size and sha256): it is
the completeness marker: a save removes it first and writes it last, each file going to a
temporary name and renamed into place, so an interrupted save never leaves a folder that loads
as complete. :meth:`Audit.load` checks everything ``audit.json`` records and raises
:class:`AuditLoadError`, naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..compare.records import Verdict
from ..core.types import HeadId
from .files import AuditLoadError, check_files, fingerprint
from .records import RECORDS, find_verdict, read_records, records_doc

if TYPE_CHECKING:
    from ..report.notebook import NotebookView
    from .show import PromptPatterns

__all__ = ["Audit", "AuditLoadError"]

FORMAT = "lensattr-audit/3"  # /3 adds tokens.csv; /2 folders load with an empty tokens table
_DATA_FILES = ("heads.csv", "edges.csv", "tokens.csv", "tensors.safetensors")
_MARKER = "audit.json"
# columns holding an integer or nothing (pandas nullable Int64), never '' or 1.000
INT_OR_MISSING = ("partner_layer", "partner_head")


@dataclass
class Audit:
    """Result of :func:`lensattr.audit`.

    heads: one row per (layer, head): claims, effects with ``_lo``/``_hi`` 95% CIs, verdict;
        ``partner_layer``/``partner_head`` are nullable integers (``Int64``).
    edges: one row per (layer, head, query position, source) examined at the metric's read
        position: attention, claimed share, effect of removing that single edge.
    tensors: per-prompt values and patterns; axes in ``meta["tensor_axes"]``.
    meta: model, task, prompts hash, metric, methods and parameters, seed, versions.
    tokens: one row per (prompt, input position): token importance claimed by raw attention,
        rollout and flow at the read rows, and measured by occlusion (metric change when the
        token's embedding is zeroed / replaced by the corrupted prompt's); see
        :mod:`lensattr.token_importance`.
    """

    heads: pd.DataFrame
    edges: pd.DataFrame
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    tokens: pd.DataFrame = field(default_factory=pd.DataFrame)
    # per head: baseline -> Verdict record (the tables are views of these)
    records: dict[HeadId, dict[str, Verdict]] = field(default_factory=dict, repr=False,
                                                      compare=False)
    # every prompt's patterns, in memory only (not saved), for show(head, prompt)
    prompt_patterns: PromptPatterns | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.heads = _int_or_missing(self.heads, "heads")
        self.edges = _int_or_missing(self.edges, "edges")

    # ---- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write heads.csv, edges.csv, tensors.safetensors and, last, audit.json into
        ``directory`` (created if needed; an earlier saved audit there is replaced, other
        files are left alone). Atomic: interrupted, the folder holds either the earlier
        complete audit or no audit.json at all, never a mixture that loads."""
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise ValueError(f"directory: {str(d)!r} exists and is not a folder")
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        writers = {
            "heads.csv": lambda p: self.heads.to_csv(p, index=False),
            "edges.csv": lambda p: self.edges.to_csv(p, index=False),
            "tensors.safetensors": lambda p: save_file(tensors, str(p)),
        }
        tables = {"heads": self.heads, "edges": self.edges}
        if len(self.tokens.columns):  # an audit built without a token table saves none
            tables["tokens"] = self.tokens
            writers["tokens.csv"] = lambda p: self.tokens.to_csv(p, index=False)
        tag = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
        temps = []
        try:
            files = {}
            for name, write in writers.items():
                tmp = d / (name + tag)
                temps.append(tmp)
                write(tmp)
                files[name] = fingerprint(tmp)
            doc = {
                "format": FORMAT,
                "meta": self.meta,
                "dtypes": {k: _dtypes(t) for k, t in tables.items()},
                "n_rows": {k: len(t) for k, t in tables.items()},
                "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v)}
                            for k, v in tensors.items()},
                "files": files,
            }
            if self.records:  # tied to this heads.csv by its checksum; not in audit.json
                rec = d / (RECORDS + tag)
                temps.append(rec)
                rec.write_text(records_doc(self.records, files["heads.csv"]["sha256"]))
            marker = d / (_MARKER + tag)
            temps.append(marker)
            marker.write_text(json.dumps(doc, indent=2, default=str))
            fingerprint(marker)  # flushed to disk before it can mark anything complete
            # the old marker goes first and the new one comes last: no moment shows a
            # complete marker beside another save's data files
            (d / _MARKER).unlink(missing_ok=True)
            for name in writers:
                os.replace(d / (name + tag), d / name)
            if self.records:
                os.replace(d / (RECORDS + tag), d / RECORDS)
            else:
                (d / RECORDS).unlink(missing_ok=True)
            os.replace(marker, d / _MARKER)
        finally:
            for t in temps:
                t.unlink(missing_ok=True)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Audit:
        """Read a folder written by :meth:`save`, checking columns, dtypes, row counts,
        tensor names and shapes, and each file's checksum against audit.json."""
        d = Path(directory)
        if not d.is_dir():
            raise AuditLoadError(f"directory: {str(d)!r} does not exist or is not a folder")
        marker = d / _MARKER
        if not marker.exists():
            present = [n for n in _DATA_FILES if (d / n).exists()]
            if present:
                raise AuditLoadError(
                    f"{marker}: missing beside {', '.join(present)}: an interrupted or "
                    "incomplete save (audit.json is written last); save the audit again"
                )
            raise AuditLoadError(f"directory: {str(d)!r} has no {_MARKER}; not a saved audit")
        try:
            doc = json.loads(marker.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AuditLoadError(f"{marker}: unreadable ({err}); not a complete saved audit"
                                 ) from err
        if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict) or not (
                isinstance(doc.get("dtypes"), dict)
                and all(isinstance(doc["dtypes"].get(t), dict) for t in ("heads", "edges"))):
            raise AuditLoadError(f"{marker}: lacks 'meta' or the column 'dtypes' of heads and "
                                 "edges; not written by Audit.save")
        heads = _read_table(d / "heads.csv", doc, "heads")
        edges = _read_table(d / "edges.csv", doc, "edges")
        tokens = pd.DataFrame()  # folders saved before the token table have none
        if "tokens" in doc["dtypes"]:
            if not isinstance(doc["dtypes"]["tokens"], dict):
                raise AuditLoadError(f"{marker}: 'dtypes' of tokens is not a table of columns; "
                                     "not written by Audit.save")
            tokens = _read_table(d / "tokens.csv", doc, "tokens")
        tensors = _read_tensors(d / "tensors.safetensors", doc)
        check_files(d, doc)
        sha = ((doc.get("files") or {}).get("heads.csv") or {}).get("sha256")
        return cls(heads=heads, edges=edges, tensors=tensors, meta=doc["meta"], tokens=tokens,
                   records=read_records(d, sha))

    def verdict(self, head, baseline: str | None = None) -> Verdict:
        """The :class:`~lensattr.compare.records.Verdict` record of ``head`` (``(layer,
        head)``) under ``baseline`` (default the primary): label, rule, the numbers it fired
        on, per-prompt ``holds``, ``sentence``."""
        return find_verdict(self.records, head, baseline or self.meta.get("primary_ablation"))

    @property
    def agreement(self) -> pd.DataFrame:
        """Which explanation agrees best with the causal evidence: rank agreement (Spearman
        rho, Kendall tau, bootstrap CIs over prompts) of every claim source (``claim``:
        attention, norm_attention, rollout, flow) with ``evidence``: the single-edge removal
        effects (per layer and over all layers, ``layer`` <NA>) and, for token importance,
        |occlusion| (per layer, per prompt then averaged). ``best`` marks the claim with the
        highest rho for each evidence and layer."""
        return pd.DataFrame(self.meta.get("agreement", []))

    # ---- display -----------------------------------------------------------------------
    def summary(self) -> str:
        m = self.meta
        lines = [
            f"lensattr audit: model {m.get('model')} | task {m.get('task')} | "
            f"{m.get('n_prompts')} prompts | metric {m.get('metric', {}).get('name')} | "
            f"primary ablation {m.get('primary_ablation')}"
        ]
        cols = [
            "layer",
            "head",
            "head_type_read",
            "top_source",
            "top_mass",
            "norm_top_source",
            f"ablation_{m.get('primary_ablation', 'zero')}",
            "routing",
            "verdict",
            "verdict_share",
            "partner",
            "compensated_under",
        ]
        cols = [c for c in cols if c in self.heads.columns]
        lines.append(self.heads[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        counts = self.heads["verdict"].value_counts().to_dict() if len(self.heads) else {}
        lines.append("verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if "baseline_sensitive" in self.heads.columns and self.heads["baseline_sensitive"].any():
            flagged = self.heads[self.heads["baseline_sensitive"].astype(bool)]
            if "baseline_flag_rank" in flagged.columns:
                flagged = flagged.sort_values("baseline_flag_rank")
            names = ", ".join(f"L{r.layer}H{r.head}" for r in flagged.itertuples())
            lines.append(f"claim changes with the ablation baseline ({len(flagged)}, most at "
                         f"stake first): {names} (see labels_by_baseline)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"Audit(model={m.get('model')!r}, task={m.get('task')!r}, "
            f"heads={len(self.heads)}, edges={len(self.edges)})"
        )

    def _repr_html_(self) -> str:
        """Notebook display: the one-line summary, verdict counts and the verdict grid."""
        from ..report.grid import notebook_html

        return notebook_html(self.heads, self.meta, self.report_inputs()["run"])

    def show(self, head=None, prompt: int | str = 0) -> NotebookView:
        """A notebook view (``.html``, ``_repr_html_``, ``save(path)``; offline). No head: the
        verdict grid. ``head`` ((layer, head) or "L0H1"): its attention on ``prompt`` (0 or
        "mean" from the saved tensors; other indices on a fresh audit) drawn by circuitsvis,
        the claimed sources (claimed_share >= 0.5) marked, and its evidence beside it."""
        from .show import show_audit

        return show_audit(self, head, prompt)

    def plot(self, kind: str = "grid", *, save: str | Path | None = None, **kwargs):
        """A matplotlib figure of this audit (needs ``pip install "lensattr[plot]"``).

        kind: ``grid`` (verdict grid), ``scatter`` (claim vs effect per head, with CIs),
        ``heatmap`` (a heads column, layer x head), ``positions`` (a [layer, pos] tensor),
        ``tokens`` (a [query_pos, key_pos] map, e.g. rollout or flow; pass ``data=``).
        save: write the figure there too (``.png``, ``.svg`` or ``.pdf``). Returns the Figure.
        """
        from ..report.figures import plot_audit

        return plot_audit(self, kind, save=save, **kwargs)

    def report(self, path: str | Path) -> Path:
        """Write the self-contained HTML report for this audit."""
        from ..report import write_report

        return write_report(path, **self.report_inputs())

    def report_inputs(self) -> dict:
        """Arguments of :func:`lensattr.report.write_report`: tables, the example prompt's
        patterns (and the mean over prompts as a second view), clean/corrupted means."""
        def per_head(pat):
            return {(int(r.layer), int(r.head)): pat[int(r.layer), int(r.head)].numpy()
                    for r in self.heads.itertuples()}

        pat = self.tensors.get("pattern_example")
        patterns = {} if pat is None else per_head(pat)
        toks = self.tensors.get("example_tokens")
        tokens = self.meta.get("example_text_tokens") or (
            [str(int(t)) for t in toks] if toks is not None else []
        )
        views = []
        mean = self.tensors.get("pattern_mean")
        if mean is not None and mean.shape[-1] == len(tokens) and mean.ndim == 4:
            n = self.meta.get("n_prompts")
            views.append((f"mean over {n} prompts (positions of prompt 0)", tokens,
                          per_head(mean)))
        run = {k: float(self.tensors[f"{k}_metric"].float().mean())
               for k in ("clean", "corrupted") if f"{k}_metric" in self.tensors}
        return {"heads": self.heads, "patterns": patterns, "tokens": tokens, "meta": self.meta,
                "edges": self.edges, "views": views, "run": run}


def _dtypes(df: pd.DataFrame) -> dict:
    return {c: str(t) for c, t in df.dtypes.items()}


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _int_or_missing(df: pd.DataFrame, table: str) -> pd.DataFrame:
    cols = [c for c in INT_OR_MISSING if c in df.columns and str(df[c].dtype) != "Int64"]
    if not cols:
        return df
    df = df.copy()
    for c in cols:
        raw = df[c].astype(object).map(lambda x: None if isinstance(x, str) and x == "" else x)
        v = pd.to_numeric(raw, errors="coerce")
        bad = raw.notna() & (v.isna() | (v != v.round()))
        if bad.any():
            raise ValueError(f"{table}: column {c!r} must hold integers or be missing, got "
                             f"{raw[bad].iloc[0]!r}")
        df[c] = v.astype("Int64")
    return df


def _read_table(path: Path, doc: dict, table: str) -> pd.DataFrame:
    if not path.exists():
        raise AuditLoadError(f"{path}: missing; audit.json records a {table} table")
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise AuditLoadError(f"{path}: not a readable CSV table ({err})") from err
    dtypes = doc["dtypes"][table]
    missing = [c for c in dtypes if c not in df.columns]
    if missing:
        raise AuditLoadError(f"{path}: missing columns {missing} that audit.json records")
    n = (doc.get("n_rows") or {}).get(table)
    if n is not None and len(df) != n:
        raise AuditLoadError(f"{path}: {len(df)} rows, but audit.json records {n}: the file "
                             "is incomplete or was changed after saving")
    df = df[list(dtypes) + [c for c in df.columns if c not in dtypes]]
    for c, t in dtypes.items():
        try:
            df[c] = _as_dtype(df[c], t)
        except (ValueError, TypeError) as err:
            raise AuditLoadError(f"{path}: column {c!r} cannot be read as {t} ({err})") from err
    return df


def _as_dtype(col: pd.Series, t: str) -> pd.Series:
    if t in ("object", "str", "string"):
        col = col.astype(object).where(col.notna(), "")
        return col.map(lambda v: v if isinstance(v, str) else str(v))
    if t == "bool":
        if col.dtype == bool:
            return col
        words = {"True": True, "False": False, True: True, False: False}
        bad = ~col.isin(list(words))
        if bad.any():
            raise ValueError(f"not True/False: {col[bad].iloc[0]!r}")
        return col.map(words).astype(bool)
    if t == "Int64":
        v = pd.to_numeric(col, errors="raise")
        if (v.notna() & (v != v.round())).any():
            raise ValueError("holds a non-integer value")
        return v.astype("Int64")
    kind: str
    try:
        kind = np.dtype(t).kind
    except TypeError:  # a pandas extension dtype
        kind = ""
    if kind in ("i", "u"):
        v = pd.to_numeric(col, errors="raise")
        if v.isna().any() or (v != v.round()).any():
            raise ValueError("holds a missing or non-integer value")
        return v.astype(t)
    if kind == "f":
        return pd.to_numeric(col, errors="raise").astype(t)
    return col.astype(t)


def _read_tensors(path: Path, doc: dict) -> dict[str, Tensor]:
    spec = doc.get("tensors")
    if not path.exists():
        if spec:
            raise AuditLoadError(f"{path}: missing; audit.json records tensors {sorted(spec)}")
        return {}
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise AuditLoadError(f"{path}: unreadable ({type(err).__name__}: {err}); the file is "
                             "truncated or not a safetensors file") from err
    missing = [name for name in spec or {} if name not in tensors]
    if missing:
        raise AuditLoadError(f"{path}: has no tensors {missing}, which audit.json records")
    for name, rec in (spec or {}).items():
        t = tensors[name]
        if list(t.shape) != list(rec.get("shape", t.shape)):
            raise AuditLoadError(f"{path}: tensor {name!r} has shape {list(t.shape)}, but "
                                 f"audit.json records {rec['shape']}")
        if _dtype_name(t) != rec.get("dtype", _dtype_name(t)):
            raise AuditLoadError(f"{path}: tensor {name!r} has dtype {_dtype_name(t)}, but "
                                 f"audit.json records {rec['dtype']}")
    return tensors
