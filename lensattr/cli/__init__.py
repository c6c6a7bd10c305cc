"""The ``lensattr`` command line (``main``), its ``patch`` sub-command (``patch``) and what they
share (``common``)."""

from .main import main

__all__ = ["main"]
