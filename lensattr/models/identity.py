"""What a model is, as hashes: its weights bit for bit and its config; and the store of probe
results that hold for one set of weights (emptied when the weights hash changes)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .state import ProbeStore

if TYPE_CHECKING:
    from .adapter import Adapter

__all__ = ["weights_hash", "current_weights_hash", "probe_store", "config_hash"]

_NOT_CONFIG = {"device", "n_devices"}  # config entries that say where, not what


def weights_hash(a: Adapter) -> str:
    """sha256 (16 hex digits) of every parameter's and buffer's name, shape, dtype and raw
    bytes (see :meth:`Adapter.weights_hash`); memoised in the probe store."""
    h = hashlib.sha256()
    with torch.no_grad():
        for kind, name, t in _weight_tensors(a.model):
            t = t.detach()
            h.update(f"{kind}|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            flat = t.cpu().contiguous().reshape(-1)
            if flat.numel():
                raw: Any = flat.view(torch.uint8).numpy()
                h.update(memoryview(raw))
    value = h.hexdigest()[:16]
    a._probes["_weights_memo"] = (_weights_version(a.model), value)
    return value


def current_weights_hash(a: Adapter) -> str:
    """:func:`weights_hash`, reused while no tensor was replaced or edited through
    autograd-visible ops (see :meth:`Adapter.current_weights_hash`)."""
    memo = a._probes.get("_weights_memo")
    if memo is not None and memo[0] == _weights_version(a.model):
        return memo[1]
    return weights_hash(a)


def probe_store(a: Adapter) -> ProbeStore:
    """The model's probe results, emptied when its weights changed since they were made."""
    a._probes.renew(current_weights_hash(a))
    return a._probes


def config_hash(cfg: Any) -> str:
    """sha256 (16 hex digits) of the config, without the device."""
    d = {k: repr(v) for k, v in sorted(vars(cfg).items()) if k not in _NOT_CONFIG}
    return hashlib.sha256(json.dumps(d).encode()).hexdigest()[:16]


def _weight_tensors(model: Any) -> Iterator[tuple[str, str, Tensor]]:
    for name, p in model.named_parameters():
        yield "param", name, p
    for name, b in model.named_buffers():
        yield "buffer", name, b


def _weights_version(model: Any) -> tuple:
    return tuple(
        (name, t.data_ptr(), t._version, tuple(t.shape), t.dtype, str(t.device))
        for _, name, t in _weight_tensors(model)
    )
