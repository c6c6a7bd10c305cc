"""What the browser tests share: where Debian's Chromium is, a bare HTML page around a body,
and opening a page offline with its console messages and every request recorded (none but
the page itself is served)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM = os.environ.get("LENSATTR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
NO_CHROMIUM = (f"no Chromium at {CHROMIUM!r}: install Debian's package (apt-get install -y "
               "chromium) or set LENSATTR_CHROMIUM")


def html_page(body: str, path: Path, title: str = "nb") -> Path:
    """Write ``body`` inside a minimal HTML document at ``path``."""
    path.write_text("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>"
                    f"{title}</title></head><body>{body}</body></html>", encoding="utf-8")
    return path


def open_offline(browser, path: Path, dialogs: bool = False):
    """``(page, seen)``: ``path`` opened in a new offline context of ``browser`` (1400 x 900);
    ``seen["console"]`` (type, text) including page errors, ``seen["requests"]`` every URL
    asked for, and with ``dialogs`` ``seen["dialogs"]`` (each dismissed)."""
    seen: dict[str, list] = {"console": [], "requests": [], "dialogs": []}
    pg = browser.new_context(viewport={"width": 1400, "height": 900}, offline=True).new_page()
    pg.on("console", lambda m: seen["console"].append((m.type, m.text)))
    pg.on("pageerror", lambda err: seen["console"].append(("pageerror", str(err))))
    if dialogs:
        pg.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))

    def record(route):
        seen["requests"].append(route.request.url)
        if route.request.url == path.as_uri():
            route.continue_()
        else:
            route.abort()

    pg.route("**/*", record)
    pg.goto(path.as_uri())
    return pg, seen
