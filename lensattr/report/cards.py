"""Per-head cards as data: the evidence beside each attention pattern, rendered in the browser
on demand (so a 270-head report stays fast). Columns others add to the heads table appear in
their own group when present (DLA, patching, attribution patching) and are skipped when absent."""

from __future__ import annotations

import math

import pandas as pd

from .data import BASELINES, cell, encode, head_id

__all__ = ["BASELINE_COLUMNS", "make_card", "LABELS"]

BASELINE_COLUMNS = ["baseline", "effect [95% CI]", "ρ (routing)", "label"]

LABELS = {
    "knockout_unclaimed": "keep only the claimed sources",
    "knockout_claimed": "remove the claimed sources",
    "knockout_claimed_renorm": "remove the claimed sources, renormalised",
    "sink_effect": "remove the sink's terms",
    "routing": "ρ: share of the effect routed through the claim",
    "effect_read_rows": "ablated at the read rows only",
    "pattern_read": "read row's weights patched (values kept)",
    "effect_other_rows": "ablated at every other row only",
    "effect_locus": "where the effect lives",
    "direct_effect": "direct effect (path to the readout only)",
    "partner": "partner",
    "joint_effect": "ablated together with the partner",
    "interaction": "interaction e(h,h′) − e(h) − e(h′)",
    "direct_minus_total": "direct − total effect",
    "compensated_under": "compensated under",
    "carriers": "sources that carry the effect",
    "carriers_row": "carriers' query row",
    "relevance": "relevance", "routing_class": "routing class",
    "verdict_rule": "rule that fired", "verdict_share": "share of prompts where it holds",
    "p_value": "p (sign-flip)", "q_value": "q (BH, relevance)", "q_null": "q (BH, null test)",
    "head_type": "type over all queries", "claim_score": "type score (all queries)",
    "head_type_read": "type at the read rows", "claim_score_read": "type score (read rows)",
    "top_source": "most attended source", "top_mass": "its attention",
    "sink_mass": "attention to the sink", "entropy": "normalised entropy",
    "diffuse": "diffuse", "norm_top_source": "norm-based top source",
    "norm_top_mass": "its norm-based share", "norm_sink_mass": "norm-based share of the sink",
}  # fmt: skip

_GROUPS = [
    ("Edits of the attention row", ["knockout_unclaimed", "knockout_claimed", "routing",
                                    "knockout_claimed_renorm", "sink_effect", "effect_read_rows",
                                    "pattern_read", "effect_other_rows", "effect_locus",
                                    "direct_effect"]),
    ("Compensation and carriers", ["partner", "joint_effect", "interaction", "direct_minus_total",
                                   "compensated_under", "carriers", "carriers_row"]),
    ("Statistics", ["relevance", "routing_class", "verdict_rule", "verdict_share", "p_value",
                    "q_value", "q_null"]),
]
_CLAIMS = ["head_type_read", "claim_score_read", "head_type", "claim_score", "top_source",
           "top_mass", "sink_mass", "norm_top_source", "norm_top_mass", "norm_sink_mass",
           "entropy", "diffuse"]
# columns other analyses add, grouped by prefix: shown when present
_PREFIX_GROUPS = [
    ("dla", "Direct logit attribution"), ("patch", "Activation patching"),
    ("path", "Path patching"), ("atp", "Attribution patching (AtP)"),
    ("attribution", "Attribution patching (AtP)"), ("decomp", "Per-source decomposition"),
    ("norm", "Norm-based attention"),
]
_NOT_EVIDENCE = {"layer", "head", "verdict", "reason", "partner_layer", "partner_head",
                 "labels_by_baseline", "baseline_sensitive", "baseline"}
_NOT_EVIDENCE |= {f"ablation_{b}" for b in BASELINES} | {f"routing_{b}" for b in BASELINES}


def _present(v: object) -> bool:
    if isinstance(v, list):
        return v[0] is not None
    return v is not None and v != ""


def _rows(row: pd.Series, columns: list[str]) -> list[list]:
    out = []
    for c in columns:
        if c in row.index:
            v = cell(row, c)
            if _present(v):
                out.append([LABELS.get(c, c), v])
    return out


def _labels(text: object) -> dict[str, str]:
    if not isinstance(text, str):
        return {}
    return dict(p.split("=", 1) for p in text.split(",") if "=" in p)


def _baselines(row: pd.Series, primary: str | None) -> list[list]:
    labels = _labels(row.get("labels_by_baseline"))
    out = []
    for b in BASELINES:
        col = f"ablation_{b}"
        if col not in row.index or encode(row[col]) is None:
            continue
        rho = cell(row, "routing") if b == primary and "routing" in row.index \
            else encode(row.get(f"routing_{b}"))
        out.append([b, cell(row, col), rho, labels.get(b, "")])
    return out


def _with_ci(row: pd.Series, column: str) -> list:
    """``[value, lo, hi]`` of ``column`` (None where absent)."""
    v = cell(row, column) if column in row.index else [None, None, None]
    return v if isinstance(v, list) else [v, None, None]


def _edges(edges: pd.DataFrame | None, tokens: list[str]) -> list[dict]:
    if edges is None or not len(edges):
        return []
    out = []
    for _, e in edges.iterrows():
        pos = e.get("source_pos")
        token = None
        if pos is not None and not (isinstance(pos, float) and math.isnan(pos)):
            if 0 <= int(pos) < len(tokens) and float(pos) == int(pos):
                token = tokens[int(pos)]
        eff, pat = _with_ci(e, "effect_remove"), _with_ci(e, "effect_pattern")
        out.append({
            "query": encode(e.get("query_role")), "source": encode(e.get("source_role")),
            "token": token, "attention": encode(e.get("attention")),
            "norm": encode(e.get("norm_attention")), "claimed": encode(e.get("claimed_share")),
            "sink": bool(e.get("is_sink", False)), "effect": eff[0], "lo": eff[1], "hi": eff[2],
            "pattern": pat,
        })
    return out


def make_card(row: pd.Series, edges: pd.DataFrame | None, tokens: list[str],
              primary: str | None) -> dict:
    """One head's card: verdict, sentence, effects by baseline, grouped evidence, claims (shown
    under the pattern) and single edges. Every value is JSON-able (see ``data.encode``)."""
    used = set(_NOT_EVIDENCE) | set(_CLAIMS)
    groups = []
    for title, cols in _GROUPS:
        used |= set(cols)
        rows = _rows(row, cols)
        if rows:
            groups.append({"title": title, "rows": rows})
    base = [c for c in row.index if not str(c).endswith(("_lo", "_hi"))]
    rest = [c for c in base if c not in used and not str(c).startswith("score_")]
    for prefix, title in _PREFIX_GROUPS:
        cols = [c for c in rest if str(c).startswith(prefix)]
        rest = [c for c in rest if c not in cols]
        rows = _rows(row, cols)
        if rows:
            groups.append({"title": title, "rows": rows})
    rows = _rows(row, rest)
    if rows:
        groups.append({"title": "Other evidence", "rows": rows})
    scores = [c for c in base if str(c).startswith("score_")]
    facts = _rows(row, _CLAIMS) + _rows(row, scores)
    verdict = encode(row.get("verdict"))
    bits = [f"{k}: {encode(row.get(c))}" for c, k in
            (("head_type_read", "type at the read rows"), ("head_type", "type"),
             ("top_source", "looks at")) if encode(row.get(c)) not in (None, "")][:2]
    if primary:
        bits.append(f"baseline: {encode(row.get('baseline')) or primary}")
    if bool(row.get("baseline_sensitive", False)):
        bits.append(f"⚠ label changes with the baseline ({row.get('labels_by_baseline')})")
    return {
        "id": head_id(row["layer"], row["head"]), "layer": int(row["layer"]),
        "head": int(row["head"]), "verdict": verdict if isinstance(verdict, str) else "",
        "subtitle": " · ".join(bits), "primary": primary or "",
        "sentence": encode(row.get("reason")) or "No verdict sentence recorded.",
        "baselines": _baselines(row, primary), "groups": groups, "facts": facts,
        "edges": _edges(edges, tokens),
    }
