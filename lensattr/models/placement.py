"""Where a model's weights live and in what dtype: ``load_model``'s ``dtype``, ``device_map``,
``n_devices`` and ``max_memory``.

For hub names they pass through to TransformerLens's ``boot_transformers`` (which hands them to
``from_pretrained`` and accelerate). TransformerLens does not place a model it is handed in
memory, so for bundled models, in-memory models, GGUF files and local folders lensattr does
what it would: casts the floating-point parameters (buffers such as rotary frequencies stay
float32) and dispatches the layers with accelerate. ``n_devices`` and ``device_map`` are
resolved by TransformerLens's own ``resolve_device_map`` (``n_devices=N``: accelerate's
"balanced" map over the first N GPUs).
"""

from __future__ import annotations

import torch

from .errors import ModelError

__all__ = ["as_dtype", "Placement", "place"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float64": torch.float64}


def as_dtype(dtype) -> torch.dtype | None:
    """``dtype`` (a torch floating dtype or its name) checked; None stays None."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in _DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ModelError(f"dtype: expected one of float32, bfloat16, float16, float64 (a "
                     f"torch.dtype or its name), got {dtype!r}")


class Placement:
    """``load_model``'s placement arguments, checked: ``device`` or a device map, not both."""

    def __init__(self, device=None, dtype=None, device_map=None, n_devices=None,
                 max_memory=None):
        self.dtype = as_dtype(dtype)
        if n_devices is not None and (isinstance(n_devices, bool) or not isinstance(
                n_devices, int) or n_devices < 1):
            raise ModelError(f"n_devices: expected a positive integer, got {n_devices!r}")
        if max_memory is not None and not isinstance(max_memory, dict):
            raise ModelError(f"max_memory: expected a dict such as {{0: '20GiB', 1: '20GiB'}}, "
                             f"got {max_memory!r}")
        from transformer_lens.utilities.multi_gpu import resolve_device_map

        try:
            self.device_map, self.max_memory = resolve_device_map(
                n_devices, device_map, device, max_memory)
        except ValueError as err:
            raise ModelError(f"device_map / n_devices: {err}") from None
        self.device = None if self.device_map is not None else device
        self.n_devices, self.given_map = n_devices, device_map

    @property
    def spread(self) -> bool:
        """Is a device map in play (accelerate places the layers)?"""
        return self.device_map is not None

    def boot_kwargs(self) -> dict:
        """What ``boot_transformers`` takes when it loads the model itself (hub names)."""
        out: dict = {"device": None if self.spread else (self.device or "cpu")}
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.spread:
            out.update(device_map=self.given_map, n_devices=self.n_devices,
                       max_memory=self.max_memory if self.given_map is not None else None)
        return out

    def pretrained_kwargs(self) -> dict:
        """What ``from_pretrained`` takes for a local folder."""
        out: dict = {}
        if self.dtype is not None:
            out["torch_dtype"] = self.dtype
        if self.spread:
            out["device_map"] = self.device_map
            if self.max_memory is not None:
                out["max_memory"] = self.max_memory
        return out


def place(hf_model, p: Placement):
    """Cast and dispatch an in-memory HF model as ``p`` says; returns the device to boot the
    bridge with (None when accelerate placed the layers: the bridge reads ``hf_device_map``)."""
    if p.dtype is not None:
        for param in hf_model.parameters():
            if param.dtype.is_floating_point:
                param.data = param.data.to(p.dtype)
    if not p.spread:
        return p.device
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    device_map = p.device_map
    if isinstance(device_map, str):
        no_split = list(getattr(hf_model, "_no_split_modules", None) or [])
        memory = p.max_memory
        if device_map in ("balanced", "balanced_low_0"):
            memory = get_balanced_memory(hf_model, max_memory=memory,
                                         no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(hf_model, max_memory=memory,
                                           no_split_module_classes=no_split)
    try:
        dispatch_model(hf_model, device_map=device_map)
    except (ValueError, KeyError) as err:
        raise ModelError(f"device_map: accelerate could not place the model ({err})") from None
    hf_model.hf_device_map = dict(device_map)
    return None
