"""Bundled models, registered with :func:`lensattr.model.register_model` on import."""

from . import planted  # noqa: F401
