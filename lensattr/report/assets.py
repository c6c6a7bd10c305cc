"""What the page inlines: circuitsvis' browser bundle (once), our CSS and script, and JSON made
safe to sit inside a ``<script>`` element."""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

__all__ = ["circuitsvis_bundle", "script_json", "stylesheet", "app_script"]

_HERE = Path(__file__).parent


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis' browser bundle (defines the global ``CircuitsVis``), safe to inline.

    Found through the import system without importing circuitsvis (which imports torch).
    ``</script`` inside the bundle (it occurs in a JS string literal) is written as
    ``<\\/script``, the same string in JavaScript, so it cannot close our tag.
    """
    spec = importlib.util.find_spec("circuitsvis")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("circuitsvis is not installed; it is needed for the HTML report")
    path = Path(next(iter(spec.submodule_search_locations))) / "dist" / "cdn" / "iife.js"
    js = path.read_text(encoding="utf-8")
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


def script_json(obj: object) -> str:
    """JSON for inside a <script> element: no ``<``, ``>`` or ``&`` can break out (NaN and
    infinities must already be encoded; see :func:`lensattr.report.data.encode`)."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))  # ensure_ascii: U+2028 too
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@lru_cache(maxsize=1)
def stylesheet() -> str:
    return (_HERE / "style.css").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def app_script() -> str:
    """The page's own script (cards, tables); it holds no ``</script``."""
    text = (_HERE / "app.js").read_text(encoding="utf-8")
    if "</script" in text.lower():
        raise AssertionError("app.js must not contain '</script'")
    return text
