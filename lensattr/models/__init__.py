"""Models: the adapter that every stage talks to a TransformerBridge through (``adapter``,
with its parts: ``identity`` (weights and config hashes, the probe store), ``weights``
(stacked weights, one layer's weights as ``BareLayer``), ``readout`` (the final readout),
``hooks``, ``errors`` and ``state`` (caches kept beside the model, never on it)), the one
functional attention block (``blocks``), fused activation modules (``fused``), loading by name,
folder or hub id (``loading``, with the registry of bundled models in ``registry`` and GGUF
files in ``gguf``), and the bundled models themselves (``zoo``)."""
