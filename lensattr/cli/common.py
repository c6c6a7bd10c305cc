"""What the ``lensattr`` sub-commands share: the one-line error and the ``--out`` check."""

from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["CLIError", "check_out"]


class CLIError(Exception):
    """An expected error of the command line itself (e.g. a bad ``--out``); one line."""


def check_out(out: Path) -> None:
    """``--out`` must be a folder lensattr can write: new, or existing (a previous audit there
    is resumed). An existing file, a parent that is a file, or a place that cannot be written
    is refused before any work starts. Nothing is left behind by the check."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out: {str(out)!r} is an existing file; expected a folder (new, or one "
                       "holding a previous audit to resume)")
    created = []
    try:
        missing = [d for d in [out, *out.parents] if not d.exists()]
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        why = err.strerror or str(err)
        raise CLIError(f"--out: cannot write to {str(out)!r} ({why})") from None
    finally:
        for d in reversed(created):
            d.rmdir()
