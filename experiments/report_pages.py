"""The HTML report at three sizes: file size and load time in headless Chromium, and the
README's screenshot (docs/report.png) of the default audit (planted, planted-copy).

    python experiments/report_pages.py [--minilm DIR] [--out experiments/results]

planted: a real audit (seconds). MiniLM (6 x 12 heads): a saved real audit if --minilm DIR is
given, else a synthetic audit of that shape. SmolLM2 (30 x 9 heads, 15-token prompts): a
synthetic audit (random tables of the real columns' shape, resampled from the planted audit),
because a real SmolLM2 audit takes hours on 2 CPU cores. Load time = navigation start to the
page's script finishing (first card drawn by circuitsvis), median of 3 fresh page loads.
Needs playwright and Debian's chromium.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lensattr
from lensattr.auditing.demo import synthetic_audit

CHROMIUM = "/usr/bin/chromium"
IOI = ["<|im_start|>", "When", " Mary", " and", " John", " went", " to", " the", " store", ",",
       " John", " gave", " a", " drink", " to"]


def load_times(path: Path, screenshot: Path | None = None, n: int = 3) -> dict:
    from playwright.sync_api import sync_playwright

    times, js = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for i in range(n):
            ctx = browser.new_context(viewport={"width": 1400, "height": 900}, offline=True)
            page = ctx.new_page()
            errors = []
            page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
            t0 = time.perf_counter()
            page.goto(path.as_uri())
            page.wait_for_selector("html[data-lensattr-ready='1']", timeout=60_000)
            page.wait_for_selector("#card .view div svg, #card .view div canvas",
                                   timeout=60_000)
            times.append(time.perf_counter() - t0)
            js.append(page.evaluate("performance.now()") / 1000)
            if errors:
                raise RuntimeError(f"{path}: page errors {errors}")
            if screenshot is not None and i == 0:
                page.screenshot(path=str(screenshot))
            ctx.close()
        browser.close()
    return {"load_s_median": round(statistics.median(times), 3),
            "load_s_runs": [round(t, 3) for t in times],
            "page_ready_s_median": round(statistics.median(js), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--minilm", default=None, help="folder of a saved MiniLM audit")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--screenshot", default="docs/report.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    planted = lensattr.audit(lensattr.load_model("planted"), "planted-copy", progress=False)
    audits = {"planted (real audit, 2 x 5 heads)": (planted, Path(args.screenshot))}
    if args.minilm:
        audits["minilm (real audit, 6 x 12 heads)"] = (lensattr.Audit.load(args.minilm), None)
    else:
        audits["minilm (synthetic, 6 x 12 heads)"] = (synthetic_audit(6, 12, 16), None)
    audits["smollm2 shape (synthetic, 30 x 9 heads, 15 tokens)"] = (
        synthetic_audit(30, 9, tokens=IOI, template=planted), None)
    rows = []
    for name, (a, shot) in audits.items():
        path = tmp / (name.split()[0] + ".html")
        t0 = time.perf_counter()
        a.report(path)
        build = time.perf_counter() - t0
        if shot is not None:
            shot.parent.mkdir(parents=True, exist_ok=True)
        rows.append({"report": name, "heads": len(a.heads), "edges": len(a.edges),
                     "bytes": path.stat().st_size, "build_s": round(build, 3),
                     **load_times(path, shot)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report_pages.json").write_text(json.dumps(rows, indent=2))
    lines = ["| report | heads | edges | file size | build | load in Chromium (median of 3) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['report']} | {r['heads']} | {r['edges']} | "
                     f"{r['bytes'] / 1e6:.2f} MB | {r['build_s']:.2f} s | "
                     f"{r['load_s_median']:.2f} s |")
    (out / "report_pages.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
