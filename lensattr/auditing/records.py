"""The verdict records of an audit on disk: ``verdicts.json`` beside the tables.

Per head and baseline, the :class:`~lensattr.compare.records.Verdict` (label, rule, relevance,
routing class, the numbers it fired on, per-prompt holds, the sentence). The tables are views
of these records; the records keep what the tables flatten away (per-prompt holds, every
baseline's numbers). The file carries the sha256 of the ``heads.csv`` it was saved with, so a
records file left from another save is never read as this audit's."""

from __future__ import annotations

import json
from pathlib import Path

from ..compare.records import Verdict
from ..core.types import HeadId

__all__ = ["RECORDS", "records_doc", "read_records", "find_verdict"]

RECORDS = "verdicts.json"
_FORMAT = "lensattr-verdicts/1"


def records_doc(records: dict[HeadId, dict[str, Verdict]], heads_sha256: str) -> str:
    rows = [{"layer": h.layer, "head": h.head,
             "by_baseline": {b: v.to_dict() for b, v in by.items()}}
            for h, by in sorted(records.items())]
    return json.dumps({"format": _FORMAT, "heads_csv_sha256": heads_sha256, "records": rows})


def read_records(directory: Path, heads_sha256: str | None) -> dict[HeadId, dict[str, Verdict]]:
    """The records saved with this ``heads.csv``; {} when there are none (audits saved before
    records existed) or the file belongs to another save."""
    path = Path(directory) / RECORDS
    if heads_sha256 is None or not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT \
            or doc.get("heads_csv_sha256") != heads_sha256:
        return {}
    return {HeadId(r["layer"], r["head"]): {b: Verdict.from_dict(v)
                                            for b, v in r["by_baseline"].items()}
            for r in doc["records"]}


def find_verdict(records: dict[HeadId, dict[str, Verdict]], head, baseline: str | None
                 ) -> Verdict:
    """``records[head][baseline]``, with errors that name the argument."""
    if not records:
        raise ValueError("this Audit holds no verdict records (saved before they existed, "
                 f"or without {RECORDS}); run the audit again")
    try:
        h = HeadId(*head)
    except TypeError:
        raise TypeError(f"head: expected (layer, head), got {head!r}") from None
    if h not in records:
        raise ValueError(f"head: {tuple(h)} was not audited; audited heads are "
                 f"{sorted(tuple(x) for x in records)[:8]}...")
    by = records[h]
    if baseline not in by:
        raise ValueError(f"baseline: {baseline!r} was not computed; expected one of {sorted(by)}")
    return by[baseline]
