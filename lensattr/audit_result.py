"""The :class:`Audit` result: tidy tables, tensors with documented axes, and metadata."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["Audit"]


@dataclass
class Audit:
    """Result of :func:`lensattr.audit`.

    heads: one row per (layer, head): claims, effects with ``_lo``/``_hi`` 95% CIs, verdict.
    edges: one row per (layer, head, query position, source) examined at the metric's read
        position: attention, claimed share, effect of removing that single edge.
    tensors: per-prompt values and patterns; axes in ``meta["tensor_axes"]``.
    meta: model, task, prompts hash, metric, methods and parameters, seed, versions.
    """

    heads: pd.DataFrame
    edges: pd.DataFrame
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ---- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write heads.csv, edges.csv, audit.json (meta + column dtypes), tensors.safetensors."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.heads.to_csv(d / "heads.csv", index=False)
        self.edges.to_csv(d / "edges.csv", index=False)
        doc = {
            "meta": self.meta,
            "dtypes": {"heads": _dtypes(self.heads), "edges": _dtypes(self.edges)},
        }
        (d / "audit.json").write_text(json.dumps(doc, indent=2, default=str))
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()},
            str(d / "tensors.safetensors"),
        )
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Audit:
        d = Path(directory)
        for name in ("heads.csv", "edges.csv", "audit.json"):
            if not (d / name).exists():
                raise FileNotFoundError(f"directory: {str(d)!r} has no {name}; not a saved audit")
        doc = json.loads((d / "audit.json").read_text())
        heads = _read(d / "heads.csv", doc["dtypes"]["heads"])
        edges = _read(d / "edges.csv", doc["dtypes"]["edges"])
        t = d / "tensors.safetensors"
        tensors = load_file(str(t)) if t.exists() else {}
        return cls(heads=heads, edges=edges, tensors=tensors, meta=doc["meta"])

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
            "head_type",
            "top_source",
            "top_mass",
            f"ablation_{m.get('primary_ablation', 'zero')}",
            "routing",
            "verdict",
            "verdict_share",
            "partner",
        ]
        cols = [c for c in cols if c in self.heads.columns]
        lines.append(self.heads[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        counts = self.heads["verdict"].value_counts().to_dict() if len(self.heads) else {}
        lines.append("verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"Audit(model={m.get('model')!r}, task={m.get('task')!r}, "
            f"heads={len(self.heads)}, edges={len(self.edges)})"
        )

    def _repr_html_(self) -> str:
        m = self.meta
        head = html.escape(
            f"Audit of {m.get('model')} on {m.get('task')} ({m.get('n_prompts')} prompts)"
        )
        return f"<h4>{head}</h4>" + self.heads.to_html(index=False, float_format="%.3f")

    def report(self, path: str | Path) -> Path:
        """Write the self-contained HTML report for this audit."""
        from .report import write_report

        return write_report(path, **self.report_inputs())

    def report_inputs(self) -> dict:
        pat = self.tensors.get("pattern_example")
        patterns = (
            {}
            if pat is None
            else {
                (int(r.layer), int(r.head)): pat[int(r.layer), int(r.head)].numpy()
                for r in self.heads.itertuples()
            }
        )
        toks = self.tensors.get("example_tokens")
        tokens = self.meta.get("example_text_tokens") or (
            [str(int(t)) for t in toks] if toks is not None else []
        )
        return {"heads": self.heads, "patterns": patterns, "tokens": tokens, "meta": self.meta}


def _dtypes(df: pd.DataFrame) -> dict:
    return {c: str(t) for c, t in df.dtypes.items()}


def _read(path: Path, dtypes: dict) -> pd.DataFrame:
    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    for c, t in dtypes.items():
        if c not in df.columns:
            continue
        if t in ("object", "str", "string"):
            df[c] = df[c].astype(object).where(df[c].notna(), "")
            df[c] = df[c].map(lambda v: v if isinstance(v, str) else str(v))
        elif t == "bool":
            df[c] = df[c].astype(bool)
        else:
            df[c] = df[c].astype(t)
    return df
