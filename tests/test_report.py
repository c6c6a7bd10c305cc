"""The HTML report: self-contained, offline, escaped, one circuitsvis view per head."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from lensattr.report import render_report, write_report
from lensattr.report.html import circuitsvis_bundle

HOSTILE = "</script><img src=x onerror=alert(1)>"
TOKENS = ["<BOS>", "When", " Mary", " & ", HOSTILE, " John"]
# A string that the circuitsvis bundle holds once, near its start.
BUNDLE_MARK = "var CircuitsVis=(()=>"


def _heads() -> pd.DataFrame:
    nan = float("nan")
    rows = [
        (0, 0, "previous-token", 0.91, "prev", "faithful", 0.8, 0.42, 0.40, 0.41, 0.38, 0.02, 0.97),
        (0, 1, "induction", 0.75, "S1+1", "misleading", 0.7, 0.30, nan, 0.28, 0.01, 0.29, 0.05),
        (1, 0, "sink", 0.99, "BOS", "inert", 1.0, 0.01, 0.00, 0.01, nan, nan, nan),
        (1, 1, "self", 0.20, "self", "faithful", 0.6, 0.25, 0.24, 0.22, 0.20, 0.04, 1.02),
        (1, 2, "local", 0.40, "local", HOSTILE, 0.5, 0.05, 0.02, 0.03, 0.01, 0.01, nan),
    ]
    cols = [
        "layer", "head", "head_type", "claim_score", "top_source", "verdict", "verdict_share",
        "ablation_zero", "ablation_mean", "ablation_resample",
        "knockout_claimed", "knockout_unclaimed", "routing",
    ]  # fmt: skip
    df = pd.DataFrame(rows, columns=cols)
    df.insert(8, "ablation_zero_lo", df["ablation_zero"] - 0.02)
    df.insert(9, "ablation_zero_hi", df["ablation_zero"] + 0.02)
    df["routing_lo"] = df["routing"] - 0.1
    df["routing_hi"] = df["routing"] + 0.1
    df["partner"] = [None, "L1H1", None, None, HOSTILE]
    df["reason"] = ["", "carried by S2", "null effect", "", "x"]
    return df


def _patterns(heads: pd.DataFrame, n: int, seed: int = 0) -> dict[tuple[int, int], np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer, head in zip(heads["layer"], heads["head"], strict=True):
        scores = rng.normal(size=(n, n)) + np.triu(np.full((n, n), -np.inf), 1)
        pattern = np.exp(scores - scores.max(-1, keepdims=True))
        out[(int(layer), int(head))] = pattern / pattern.sum(-1, keepdims=True)
    return out


META = {
    "model": "tiny-gpt2 <test>",
    "task": "IOI",
    "metric": "logit_diff",
    "n_prompts": 8,
    "versions": {"lensattr": "0.1.0", "transformer_lens": "4.3.0"},
    "parameters": {"delta": 0.03, "tau": 0.1},
}


@pytest.fixture(scope="module")
def page() -> str:
    heads = _heads()
    return render_report(heads, _patterns(heads, len(TOKENS)), TOKENS, META, title="audit <x>")


def test_bundle_inlined_once_and_safe(page: str) -> None:
    assert page.count(BUNDLE_MARK) == 1
    assert circuitsvis_bundle().count(BUNDLE_MARK) == 1
    assert "</script" not in circuitsvis_bundle().lower()


def test_one_render_call_per_head(page: str) -> None:
    calls = re.findall(r"CircuitsVis\.render\((\"[^\"]+\"), CircuitsVis\.AttentionPattern, ", page)
    assert len(calls) == len(_heads())
    assert len(set(calls)) == len(calls)
    for div_id in calls:  # each call has its target div before it
        assert page.index(f"<div id='{div_id.strip(chr(34))}'") < page.index(div_id)


def test_hostile_strings_are_escaped(page: str) -> None:
    assert HOSTILE not in page
    assert "<img" not in page
    assert "onerror=alert(1)>" not in page
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page  # table and titles
    assert "\\u003c/script\\u003e\\u003cimg" in page  # inside the JSON props
    assert "<title>audit &lt;x&gt;</title>" in page
    # only our own script elements close: the bundle's and one per head
    assert page.count("</script>") == 1 + len(_heads())
    in_bundle = circuitsvis_bundle().count("<script>")  # a JS string literal, harmless
    assert page.count("<script>") - in_bundle == 1 + len(_heads())
    assert "<!--" not in page


def test_offline(page: str) -> None:
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, flags=re.IGNORECASE)
    assert not re.search(r"<link[^>]*href\s*=\s*['\"]?https?:", page, flags=re.IGNORECASE)
    assert "unpkg.com" not in page and "cdn.jsdelivr" not in page


def test_numbers_nan_and_confidence_intervals(page: str) -> None:
    assert "<td class='num'>–</td>" in page  # NaN ablation_mean
    assert "0.420 [0.400, 0.440]" in page  # ablation_zero with its CI
    assert "0.970 [0.870, 1.070]" in page  # routing with its CI
    assert "ablation_zero_lo" not in page  # folded into the ablation_zero column
    assert "knockout_claimed" in page and "carried by S2" in page and "L1H1" in page


def test_verdict_summary_and_colours(page: str) -> None:
    summary = page[page.index("<table class='summary'>") :]
    summary = summary[: summary.index("</table>")]
    assert re.search(r">faithful</td><td class='num'>2</td>", summary)
    assert re.search(r">misleading</td><td class='num'>1</td>", summary)
    assert re.search(r">inert</td><td class='num'>1</td>", summary)
    assert "&lt;/script&gt;" in summary  # an unknown verdict string still renders, uncoloured
    assert '<td style="background:#a8e0b4">faithful</td>' in page
    assert '<td style="background:#f2a3a3">misleading</td>' in page


def test_meta_table(page: str) -> None:
    assert "<th>model</th><td>tiny-gpt2 &lt;test&gt;</td>" in page
    assert "<th>n_prompts</th><td>8</td>" in page
    assert "<th>transformer_lens</th><td>4.3.0</td>" in page


def test_static_fallback_per_head(page: str) -> None:
    assert page.count("<svg ") == len(_heads())
    assert "<rect " in page


def test_missing_pattern_and_bad_shape() -> None:
    heads = _heads()
    patterns = _patterns(heads, len(TOKENS))
    del patterns[(1, 2)]
    page = render_report(heads, patterns, TOKENS, {})
    assert page.count("CircuitsVis.AttentionPattern, ") == len(heads) - 1
    assert "No attention pattern recorded." in page
    patterns[(1, 2)] = np.ones((3, 4))
    with pytest.raises(ValueError, match="L1H2"):
        render_report(heads, patterns, TOKENS, {})


def test_write_report(tmp_path) -> None:
    heads = _heads()
    out = write_report(
        tmp_path / "sub" / "report.html",
        heads=heads,
        patterns=_patterns(heads, len(TOKENS)),
        tokens=TOKENS,
        meta=META,
    )
    assert out.is_file()
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.count(BUNDLE_MARK) == 1
