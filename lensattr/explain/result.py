"""The :class:`ExplanationTests` result: every test's tables, the attention found by the
adversarial search, the token attributions and their agreement with attention claims, and
``meta``. Saved as a folder of CSVs, ``tensors.safetensors`` and, written last,
``explain.json`` (meta and each table's row count), so an interrupted save never loads."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["ExplanationTests", "ExplainLoadError", "UNIT_KEYS"]

FORMAT = "lensattr-explain/1"
MARKER = "explain.json"
UNIT_KEYS = ["unit", "kind", "layer", "head"]


class ExplainLoadError(ValueError):
    """A saved result that cannot be loaded as it was saved; the message names the file."""


@dataclass
class ExplanationTests:
    """Result of :func:`lensattr.explanation_tests`.

    tables: test name -> tidy DataFrame; ``<test>`` one row per (unit, draw, prompt) or
        (unit, prompt), ``<test>_summary`` one row per unit (a head, or a whole layer);
        ``attributions`` one row per (prompt, position) with a column per method;
        ``agreement`` one row per (claim, method, layer) with Spearman/Kendall and CIs.
    tensors: ``adversarial.<head>`` [batch, query_pos, key_pos] attention found;
        ``scores.<method>`` [batch, pos] token importance.
    meta: model, task, prompts hash, metric, eps, rows, parameters and seconds per test.
    """

    tables: dict[str, pd.DataFrame]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.tables = {k: _int_or_missing(v) for k, v in self.tables.items()}

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name not in self.tables:
            raise KeyError(f"table: no {name!r}; this result has {sorted(self.tables)}")
        return self.tables[name]

    def to_frame(self) -> pd.DataFrame:
        """One row per unit (head or layer) with every test's summary columns, prefixed by
        the test (``permuted_``, ``baselines_``, ``adversarial_``)."""
        out = None
        for test in ("permuted", "baselines", "adversarial"):
            t = self.tables.get(f"{test}_summary")
            if t is None:
                continue
            t = t.rename(columns={c: f"{test}_{c}" for c in t.columns if c not in UNIT_KEYS})
            out = t if out is None else out.merge(t, on=UNIT_KEYS, how="outer", sort=False)
        return pd.DataFrame(columns=UNIT_KEYS) if out is None else out

    def summary(self) -> str:
        lines = [f"explanation tests: {self.meta.get('model')} on {self.meta.get('task')} "
                 f"({self.meta.get('n_prompts')} prompts, eps={self.meta.get('eps'):.4g}, "
                 f"rows={self.meta.get('rows')})"]
        for test, secs in self.meta.get("seconds", {}).items():
            lines.append(f"  {test}: {secs:.1f} s")
        frame = self.to_frame()
        if len(frame):
            lines.append(frame.to_string(index=False, max_cols=12, float_format="%.3g"))
        return "\n".join(lines)

    # ---- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        marker = d / MARKER
        marker.unlink(missing_ok=True)
        for name, t in self.tables.items():
            t.to_csv(d / f"{name}.csv", index=False)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(d / "tensors.safetensors"))
        doc = {"format": FORMAT, "meta": self.meta,
               "tables": {k: {"rows": len(v), "columns": list(v.columns)}
                          for k, v in self.tables.items()},
               "tensors": {k: list(v.shape) for k, v in tensors.items()}}
        tmp = d / (MARKER + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(marker)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> ExplanationTests:
        d = Path(directory)
        marker = d / MARKER
        if not marker.is_file():
            raise ExplainLoadError(f"{marker}: missing; not a saved explanation-tests folder, or "
                                   "an incomplete save (explain.json is written last)")
        try:
            doc = json.loads(marker.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ExplainLoadError(f"{marker}: unreadable ({err})") from None
        if doc.get("format") != FORMAT:
            raise ExplainLoadError(f"{marker}: format {doc.get('format')!r}, expected {FORMAT!r}")
        tables = {}
        for name, rec in doc["tables"].items():
            path = d / f"{name}.csv"
            try:
                t = pd.read_csv(path)
            except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
                raise ExplainLoadError(f"{path}: unreadable ({err})") from None
            if len(t) != rec["rows"] or list(t.columns) != rec["columns"]:
                raise ExplainLoadError(f"{path}: {len(t)} rows / columns {list(t.columns)}, but "
                                       f"{MARKER} records {rec['rows']} / {rec['columns']}")
            tables[name] = t
        path = d / "tensors.safetensors"
        try:
            tensors = load_file(str(path)) if doc["tensors"] or path.exists() else {}
        except Exception as err:  # safetensors raises its own types for damaged files
            raise ExplainLoadError(f"{path}: unreadable ({err})") from err
        for k, shape in doc["tensors"].items():
            if k not in tensors or list(tensors[k].shape) != shape:
                raise ExplainLoadError(f"{path}: tensor {k!r} missing or not of shape {shape}")
        return cls(tables, {k: torch.as_tensor(v) for k, v in tensors.items()}, doc["meta"])


def _int_or_missing(t: pd.DataFrame) -> pd.DataFrame:
    """``layer``/``head`` as nullable integers (a layer unit has no head), never 1.0 or ''."""
    t = t.copy()
    for col in ("head", "layer"):
        if col in t.columns:
            t[col] = pd.array(t[col].astype(object).where(t[col].notna(), None), dtype="Int64")
    return t
