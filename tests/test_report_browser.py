"""The report in a real browser: headless Chromium (Debian's ``chromium`` package), driven by
playwright's Python client with the system browser (no browser download). Skips, saying why,
where either is missing; ``.ci/run`` tries to install chromium."""

from __future__ import annotations

from pathlib import Path

import pytest

from lensattr.auditing.demo import synthetic_audit
from lensattr.cli.main import main

from .browser import CHROMIUM, NO_CHROMIUM, open_offline

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install 'lensattr[dev]')")

if not Path(CHROMIUM).is_file():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

SCRIPT = "<script>window.__pwned = 1</script>"
IMG = '"><img src=x onerror="window.__pwned = 2">'


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, object]:
    """A saved 30 x 9 audit (SmolLM2's shape) with hostile prompt tokens, reported through
    ``lensattr report DIR``."""
    tokens = ["<bos>", "When", SCRIPT, " and", IMG, " went"]
    a = synthetic_audit(30, 9, tokens=tokens, seed=3)
    a.heads.loc[0, "reason"] = f"hostile reason {SCRIPT}{IMG}"
    d = tmp_path_factory.mktemp("audit")
    a.save(d)
    assert main(["report", str(d)]) == 0
    return d / "report.html", a


@pytest.fixture(scope="module")
def page(report):
    path, _ = report
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg, seen = open_offline(browser, path, dialogs=True)
        pg.wait_for_selector("html[data-lensattr-ready='1']", timeout=20_000)
        yield pg, seen
        browser.close()


def test_loads_offline_without_errors(page, tmp_path):
    pg, seen = page
    pg.wait_for_selector("#card .view div svg, #card .view div canvas, #card .view div table",
                         timeout=10_000)  # circuitsvis drew the default card's pattern
    pg.screenshot(path=str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000
    errors = [m for m in seen["console"] if m[0] in ("error", "pageerror")]
    assert errors == []
    assert len(seen["requests"]) == 1  # the report file itself, nothing else


def test_grid_cell_per_head_and_first_verdict_in_view(page, report):
    pg, _ = page
    _, a = report
    assert pg.locator("table.grid td.v").count() == len(a.heads) == 270
    cell = pg.locator("#cell-L0H0")
    box = cell.bounding_box()
    assert box and box["x"] >= 0 and box["y"] >= 0
    assert box["x"] + box["width"] <= 1400 and box["y"] + box["height"] <= 900  # no scrolling
    assert pg.evaluate("window.scrollY") == 0
    verdict = a.heads.loc[0, "verdict"]
    assert cell.get_attribute("data-verdict") == verdict
    letter = {"faithful": "F", "misleading": "M", "partial": "P", "compensated": "C",
              "inert": "I", "negligible": "N", "undetermined": "U"}[verdict]
    assert cell.inner_text().startswith(letter) and cell.is_visible()
    assert f"{letter} {verdict}" in pg.locator(".legend").inner_text()  # the letter, in words


def test_card_opens_and_hostile_strings_stay_text(page):
    pg, seen = page
    pg.click("#cell-L0H0 a")
    pg.wait_for_function("document.querySelector('#card h3').textContent.startsWith('L0H0')")
    body = pg.evaluate("document.body.innerText")
    assert SCRIPT in body and IMG in body  # shown as text in the edge rows and the sentence
    assert pg.evaluate("window.__pwned") is None
    assert pg.evaluate("document.querySelectorAll('img').length") == 0
    assert seen["dialogs"] == []
    pg.select_option("#card select", index=1)  # the prompt picker: mean over prompts
    pg.wait_for_timeout(200)
    assert pg.evaluate("window.__pwned") is None


def test_tables_sort_and_filter(page, report):
    pg, _ = page
    _, a = report
    n_mis = int((a.heads["verdict"] == "misleading").sum())
    pg.select_option("#heads-table select", "misleading")
    assert pg.locator("#heads-table tbody tr, #heads-table table tr").count() - 1 == n_mis
    pg.select_option("#heads-table select", "")
    pg.fill("#heads-table input", "L29H8")
    assert "1 of 270 rows" in pg.locator("#heads-table .muted").inner_text()
    pg.fill("#heads-table input", "")
    pg.click("#heads-table th:has-text('effect')")  # ascending by the primary effect
    first = pg.locator("#heads-table table tr").nth(1).locator("td").first.inner_text()
    low = a.heads.loc[a.heads["ablation_resample"].idxmin()]
    assert first == f"L{low['layer']}H{low['head']}"
    pg.click("#edges-details summary")
    pg.wait_for_selector("#edges-table table")
    assert f"of {len(a.edges)} rows" in pg.locator("#edges-table .muted").inner_text()
