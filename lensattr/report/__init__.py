"""Reports of an audit: an offline, self-contained HTML page (rendering kept apart from logic)."""

from lensattr.report.html import VERDICT_COLOURS, render_report, write_report

__all__ = ["VERDICT_COLOURS", "render_report", "write_report"]
