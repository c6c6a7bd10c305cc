"""Comparison: claim against evidence, per head and per edge. Effects with intervals and the
screening tests (``judge``, ``screening``), where the effect lives (``locus``), compensation
between heads (``compensation``), the verdict rules (``verdicts``), AtP against exact patching
(``atp_agreement``) and token-level importance against the claims (``token_importance``)."""
