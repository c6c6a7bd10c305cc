"""The HTML report: self-contained, offline, escaped; cards drawn on demand from JSON data."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from lensattr.report import notebook_html, render_report, write_report
from lensattr.report.assets import app_script, circuitsvis_bundle
from lensattr.report.grid import top_heads

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


def page_data(page: str) -> dict:
    """The JSON block the page's script draws from."""
    m = re.search(r"<script type='application/json' id='lensattr-data'>(.*?)</script>", page,
                  flags=re.DOTALL)
    assert m, "no data block"
    return json.loads(m.group(1))


def test_one_card_and_pattern_per_head(page: str) -> None:
    data = page_data(page)
    ids = [c["id"] for c in data["cards"]]
    assert ids == ["L0H0", "L0H1", "L1H0", "L1H1", "L1H2"]
    assert len(data["views"]) == 1 and data["views"][0]["tokens"] == TOKENS
    assert data["views"][0]["causal"] is True
    mats = data["patterns"][0]
    assert len(mats) == 5 and all(len(m) == len(TOKENS) for m in mats)
    expect = _patterns(_heads(), len(TOKENS))[(1, 1)]
    np.testing.assert_allclose(np.array(mats[3]) / 1000, expect, atol=6e-4)  # permille
    # circuitsvis is called by the page's script when a card opens, not once per head
    assert page.count("CircuitsVis.render(") == 1


def test_hostile_strings_are_escaped(page: str) -> None:
    assert HOSTILE not in page
    assert "<img" not in page
    assert "onerror=alert(1)>" not in page
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page  # chips and grid
    assert "\\u003c/script\\u003e\\u003cimg" in page  # inside the JSON data
    assert "<title>audit &lt;x&gt;</title>" in page
    # only our own script elements close: data, circuitsvis bundle, the page's script
    assert page.count("</script>") == 3
    in_bundle = circuitsvis_bundle().count("<script>")  # a JS string literal, harmless
    assert page.count("<script") - in_bundle == 3
    assert "<!--" not in page
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", app_script())


def test_offline(page: str) -> None:
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, flags=re.IGNORECASE)
    assert not re.search(r"<link[^>]*href\s*=\s*['\"]?https?:", page, flags=re.IGNORECASE)
    assert "unpkg.com" not in page and "cdn.jsdelivr" not in page


def test_numbers_nan_and_confidence_intervals(page: str) -> None:
    spec = page_data(page)["heads"]
    cols = spec["columns"]
    assert cols[:4] == ["L·H", "verdict", "reason", "effect"]  # verdict and reason first
    assert "ablation_zero_lo" not in cols  # folded into the ablation_zero column
    row = dict(zip(cols, spec["rows"][0], strict=True))
    assert row["ablation_zero"] == [0.42, 0.4, 0.44]
    assert row["routing"] == [0.97, 0.87, 1.07]
    assert row["effect"] == 0.41  # ablation_resample, the primary baseline here
    assert dict(zip(cols, spec["rows"][2], strict=True))["routing"] == [None, None, None]
    assert dict(zip(cols, spec["rows"][1], strict=True))["ablation_mean"] is None  # NaN
    assert "knockout_claimed" in cols and "carried by S2" in page and "L1H1" in page


def test_infinite_interval_is_kept() -> None:
    heads = _heads()
    heads.loc[0, "ablation_zero_hi"] = float("inf")
    page = render_report(heads, {}, TOKENS, META)
    row = page_data(page)["heads"]["rows"][0]
    assert [0.42, 0.4, "inf"] in row


def test_verdict_summary_and_colours(page: str) -> None:
    chips = page[page.index("<div class='chips'>"):]
    chips = chips[: chips.index("</div>")]
    assert "faithful 2</span>" in chips and "misleading 1</span>" in chips
    assert "inert 1</span>" in chips
    assert "&lt;/script&gt;" in chips  # an unknown verdict string still renders, uncoloured
    assert "style='background:#a8e0b4'>faithful 2" in chips
    assert page_data(page)["colours"]["misleading"] == "#f2a3a3"


def test_grid_one_cell_per_head_with_effect(page: str) -> None:
    cells = re.findall(r"<td id='cell-(L\d+H\d+)' class='v' data-verdict='([^']*)'", page)
    assert [c[0] for c in cells] == ["L0H0", "L0H1", "L1H0", "L1H1", "L1H2"]
    assert cells[0][1] == "faithful"
    assert "<a href='#L0H0'><b>F</b>.41</a>" in page  # letter + primary effect
    assert "<a href='#L0H1'><b>M</b>.28</a>" in page
    assert "<a href='#L1H2'><b>?</b>.03</a>" in page  # unknown verdict
    assert page.count("<td></td>") == 1  # L0H2 does not exist: an empty cell


def test_summary_line_and_top_heads(page: str) -> None:
    assert "<b>tiny-gpt2 &lt;test&gt;</b> · task <b>IOI</b> · metric <b>logit_diff</b>" in page
    assert "effects under <b>resample</b> ablation" in page
    top = top_heads(_heads(), META)
    # relevant heads by |effect|: faithful 0.41, misleading 0.28, faithful 0.22
    assert [t[0] for t in top] == ["L0H0", "L0H1", "L1H1"]
    assert "not through what its attention claims (S1+1)" in top[1][2]
    assert page_data(page)["default_card"] == 0
    run = render_report(_heads(), {}, TOKENS, META, run={"clean": 3.0, "corrupted": -1.0})
    assert "clean 3 → corrupted -1 (gap -4)" in run


def test_card_evidence_and_other_columns() -> None:
    heads = _heads()
    heads["dla_logit"] = [0.5, 0.1, 0.0, 0.2, 0.3]
    heads["patch_q"], heads["patch_q_lo"], heads["patch_q_hi"] = 0.2, 0.1, 0.3
    edges = pd.DataFrame({"layer": [0, 0], "head": [0, 0], "query_role": ["END", "END"],
                          "source_role": ["S1", "X"], "source_pos": [2, 4],
                          "attention": [0.7, 0.1], "effect_remove": [0.3, 0.0],
                          "effect_remove_lo": [0.2, -0.1], "effect_remove_hi": [0.4, 0.1]})
    data = page_data(render_report(heads, {}, TOKENS, META, edges=edges))
    card = data["cards"][0]
    assert card["verdict"] == "faithful" and card["sentence"] == "No verdict sentence recorded."
    assert card["baselines"][0] == ["zero", [0.42, 0.4, 0.44], None, ""]
    assert card["baselines"][2] == ["resample", 0.41, [0.97, 0.87, 1.07], ""]
    groups = {g["title"]: dict(g["rows"]) for g in card["groups"]}
    assert groups["Edits of the attention row"]["keep only the claimed sources"] == 0.02
    assert groups["Direct logit attribution"] == {"dla_logit": 0.5}
    assert groups["Activation patching"] == {"patch_q": [0.2, 0.1, 0.3]}
    assert card["edges"][0]["token"] == " Mary" and card["edges"][1]["token"] == HOSTILE
    assert card["edges"][0]["effect"] == 0.3 and card["edges"][0]["lo"] == 0.2
    assert data["cards"][1]["edges"] == []
    assert data["edges"]["columns"][:4] == ["L·H", "verdict", "query_role", "source_role"]
    plain = page_data(render_report(_heads(), {}, TOKENS, META))["cards"][0]
    assert not any("patch" in g["title"].lower() for g in plain["groups"])  # absent: skipped


def test_meta_table(page: str) -> None:
    assert "<th>model</th><td>tiny-gpt2 &lt;test&gt;</td>" in page
    assert "<th>n_prompts</th><td>8</td>" in page
    assert "<th>transformer_lens</th><td>4.3.0</td>" in page


def test_notebook_html_has_grid_and_no_script() -> None:
    nb = notebook_html(_heads(), META)
    assert "<script" not in nb and "verdict grid" in nb and "tiny-gpt2 &lt;test&gt;" in nb
    assert nb.count("class='v'") == 5 and HOSTILE not in nb


def test_missing_pattern_and_bad_shape() -> None:
    heads = _heads()
    patterns = _patterns(heads, len(TOKENS))
    del patterns[(1, 2)]
    mats = page_data(render_report(heads, patterns, TOKENS, {}))["patterns"][0]
    assert [m is None for m in mats] == [False, False, False, False, True]
    patterns[(1, 2)] = np.ones((3, 4))
    with pytest.raises(ValueError, match="L1H2"):
        render_report(heads, patterns, TOKENS, {})
    with pytest.raises(ValueError, match="heads: needs 'layer' and 'head'"):
        render_report(heads.drop(columns="layer"), {}, TOKENS, {})


def test_second_view_for_the_picker() -> None:
    heads = _heads()
    mean = _patterns(heads, len(TOKENS), seed=1)
    full = {k: np.full((len(TOKENS),) * 2, 1 / len(TOKENS)) for k in mean}  # an encoder
    data = page_data(render_report(heads, _patterns(heads, len(TOKENS)), TOKENS, META,
                                   views=[("mean", TOKENS, mean), ("enc", TOKENS, full)]))
    assert [v["name"] for v in data["views"]] == ["example prompt 0", "mean", "enc"]
    assert [v["causal"] for v in data["views"]] == [True, True, False]


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
