"""The auditing pipeline: every head's claims against its evidence, in one call
(:func:`lensattr.audit`; the package is not named ``audit`` so that name stays the function).

``plan`` resolves the inputs, ``run`` drives the stages, ``atp`` / ``integration`` add the
optional screens and claim columns, ``columns`` flattens the records into tables, ``result``
holds them (:class:`Audit`), ``meta`` describes the run, ``demo`` builds a synthetic result for
the report's tests."""

from .result import Audit, AuditLoadError
from .run import audit

__all__ = ["audit", "Audit", "AuditLoadError"]
