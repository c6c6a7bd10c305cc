"""Reports of an audit: an offline, self-contained HTML page and static figures (rendering kept
apart from logic). Figures need matplotlib (``pip install "lensattr[plot]"``), imported lazily."""

from .grid import VERDICT_COLOURS, notebook_html
from .html import render_report, write_report

__all__ = ["VERDICT_COLOURS", "notebook_html", "render_report", "write_report"]
