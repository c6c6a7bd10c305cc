"""``Audit.show`` views in a real browser, as a notebook shows them: the grid view and two head
views on one page (circuitsvis' bundle inlined once, by the first head view), opened offline
in headless Chromium (Debian's ``chromium``) through playwright. Skips like
test_report_browser.py where either is missing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import lensattr
from lensattr.report import notebook

from .browser import CHROMIUM, NO_CHROMIUM, html_page, open_offline

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install 'lensattr[dev]')")

if not Path(CHROMIUM).is_file():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

HOSTILE = "<img src=x onerror=\"window.__pwned=1\">"


@pytest.fixture(scope="module")
def audit():
    return lensattr.audit(lensattr.load_model("planted"), "planted-copy", progress=False)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def notebook_page(audit, browser, tmp_path_factory):
    toks = list(audit.meta["example_text_tokens"])
    toks[1] = HOSTILE  # S1's token, claimed by L0H0
    hostile = dataclasses.replace(audit, meta={**audit.meta, "example_text_tokens": toks},
                                  prompt_patterns=None)
    notebook.resend_bundle()  # as in a fresh kernel: the first head view carries the bundle
    outputs = [audit.show()._repr_html_(), audit.show((0, 1))._repr_html_(),
               hostile.show((0, 0))._repr_html_()]
    assert "".join(outputs).count("data-lensattr-bundle") == 1
    path = html_page("".join(f"<div class='cell-output'>{o}</div>" for o in outputs),
                 tmp_path_factory.mktemp("nb") / "notebook.html")
    pg, seen = open_offline(browser, path)
    yield pg, seen, path
    pg.context.close()


def test_head_views_render_offline_without_errors(notebook_page, tmp_path):
    pg, seen, path = notebook_page
    views = pg.locator(".lensattr-view.lensattr-head")
    assert views.count() == 2 and pg.locator(".lensattr-view.lensattr-grid").count() == 1
    for i in range(2):
        uid = views.nth(i).get_attribute("id")
        pg.wait_for_selector(f"#{uid}-pattern canvas", timeout=15_000)  # circuitsvis drew it
        assert pg.get_attribute(f"#{uid}-pattern", "data-state") == "drawn"
        box = pg.locator(f"#{uid}-pattern canvas").first.bounding_box()
        assert box and box["width"] > 100 and box["height"] > 100
    pg.wait_for_timeout(300)
    pg.screenshot(path=str(tmp_path / "nb.png"), full_page=True)
    assert (tmp_path / "nb.png").stat().st_size > 10_000
    assert [m for m in seen["console"] if m[0] in ("error", "pageerror")] == []
    assert seen["requests"] == [path.as_uri()]  # the page itself, nothing else


def test_claimed_tokens_marked_and_hostile_text_inert(notebook_page):
    pg, _, _ = notebook_page
    views = pg.locator(".lensattr-view.lensattr-head")
    for i, (hid, claimed, text) in enumerate([("L0H1", "DECOY", "then"),
                                              ("L0H0", "S1", HOSTILE)]):
        v = views.nth(i)
        assert v.get_attribute("data-head") == hid
        tok = v.locator(".lensattr-strip .lensattr-tok.claimed")
        assert tok.count() == 1 and tok.get_attribute("data-source") == claimed
        assert tok.inner_text() == "★" + text and tok.is_visible()
        plain = v.locator(".lensattr-strip .lensattr-tok:not(.claimed)").first
        bg = "e => getComputedStyle(e).backgroundColor"
        assert tok.evaluate(bg) == "rgb(253, 226, 200)" != plain.evaluate(bg)
        assert v.locator("tr.lensattr-src.claimed").get_attribute("data-source") == claimed
    assert pg.evaluate("window.__pwned") is None
    assert pg.evaluate("document.querySelectorAll('.cell-output img').length") == 0


def test_without_the_bundle_a_view_says_how_to_get_it(audit, browser, tmp_path):
    notebook.resend_bundle()
    audit.show((0, 0))._repr_html_()  # an earlier output took the bundle (then was cleared)
    path = html_page(audit.show((0, 1))._repr_html_(), tmp_path / "late.html")
    pg, seen = open_offline(browser, path)
    try:
        pg.wait_for_selector(".lensattr-pattern[data-state='missing']",
                             timeout=notebook.WAIT_MS + 10_000)
        assert "resend_bundle()" in pg.locator(".lensattr-pattern").inner_text()
        assert seen["requests"] == [path.as_uri()]
        assert [m for m in seen["console"] if m[0] in ("error", "pageerror")] == []
    finally:
        pg.context.close()
