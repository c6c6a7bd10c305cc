"""File integrity of a saved audit: each file's size and sha256, checked on load."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["AuditLoadError", "fingerprint", "check_files", "checksum"]


class AuditLoadError(ValueError):
    """A saved audit that cannot be loaded as it was saved; the message names the file."""


def fingerprint(path: Path) -> dict:
    """Size and sha256 of a file, after flushing it to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return checksum(path)


def check_files(d: Path, doc: dict) -> None:
    for name, rec in (doc.get("files") or {}).items():
        now = checksum(d / name)
        if now != rec:
            raise AuditLoadError(
                f"{d / name}: its contents differ from what audit.json records ({now['bytes']} "
                f"bytes, sha256 {now['sha256'][:12]}..., saved {rec.get('bytes')} bytes, "
                f"{str(rec.get('sha256'))[:12]}...): the file was changed or damaged after saving"
            )


def checksum(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}
