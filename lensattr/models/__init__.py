"""Models: the adapter that every stage talks to a TransformerBridge through (``adapter``),
fused activation modules (``fused``), loading by name, folder or hub id (``loading``, with the
registry of bundled models in ``registry`` and GGUF files in ``gguf``), and the bundled models
themselves (``zoo``)."""
