"""What lensattr remembers about a model, kept beside it and never on it.

The caller's model object is left as it was given: lensattr adds no attribute to it. What it
remembers per model lives in module-level :class:`ModelCache` objects keyed by the model's
identity:

* the name the model was loaded under and whether its logits mean anything (set by
  :mod:`.loading`; :func:`remember`, :func:`loaded_name`, :func:`logits_meaningful`);
* its probe results (:func:`shared_probes`): the adapter's checks of how the model runs, the
  weights-hash memo and the stacked weight copies, valid for one set of weights (see
  :class:`ProbeStore`).

Bounds. An entry lives exactly as long as its model: the cache holds a weak reference whose
callback drops the entry when the model is collected, so there is at most one entry per live
model. The shared probe entries are plain data only (bools, hashes, detached tensors), never
anything that could reach the model and so keep it alive; the largest is the stacked weight
copies (W_Q, W_K, W_V, W_O and their biases over all layers: one copy of the attention weights
per live model, for its current weights only, dropped when they change). Probe results that
are objects (e.g. a checked hook-free forward, which holds the adapter and so the model) stay
with the :class:`~lensattr.models.adapter.Adapter` that made them. An object that takes no weak
reference (a stand-in, not a ``TransformerBridge``) is held in a small LRU of
``_STRONG_MAX`` entries instead.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

__all__ = ["ModelCache", "ProbeStore", "remember", "loaded_name", "logits_meaningful",
           "shared_probes"]

V = TypeVar("V")
_STRONG_MAX = 8


class ModelCache(Generic[V]):
    """A value per model, keyed by identity (models need not be hashable), dropped when the
    model is collected."""

    def __init__(self) -> None:
        self._weak: dict[int, tuple[weakref.ref, V]] = {}
        self._strong: OrderedDict[int, tuple[object, V]] = OrderedDict()

    def get(self, model: object) -> V | None:
        k = id(model)
        hit = self._weak.get(k)
        if hit is not None and hit[0]() is model:
            return hit[1]
        held = self._strong.get(k)
        if held is not None and held[0] is model:
            self._strong.move_to_end(k)
            return held[1]
        return None

    def put(self, model: object, value: V) -> V:
        k = id(model)

        def gone(r: weakref.ref) -> None:  # the model is being collected
            self._drop(k, r)

        try:
            ref = weakref.ref(model, gone)
        except TypeError:  # takes no weak reference: held, in a small LRU
            self._strong[k] = (model, value)
            self._strong.move_to_end(k)
            while len(self._strong) > _STRONG_MAX:
                self._strong.popitem(last=False)
            return value
        self._weak[k] = (ref, value)
        return value

    def setdefault(self, model: object, make: Callable[[], V]) -> V:
        value = self.get(model)
        return self.put(model, make()) if value is None else value

    def __len__(self) -> int:
        return len(self._weak) + len(self._strong)

    def _drop(self, k: int, ref: weakref.ref) -> None:
        hit = self._weak.get(k)
        if hit is not None and hit[0] is ref:
            del self._weak[k]


_INFO: ModelCache[dict[str, Any]] = ModelCache()
_PROBES: ModelCache[dict[Any, Any]] = ModelCache()


def remember(model: object, **info: Any) -> None:
    """Remember facts about ``model`` (``name=``, ``logits_meaningful=``) beside it."""
    _INFO.setdefault(model, dict).update(info)


def loaded_name(model: object) -> str | None:
    """The name ``model`` was loaded under (:func:`lensattr.load_model`), or None."""
    return (_INFO.get(model) or {}).get("name")


def logits_meaningful(model: object) -> bool:
    """False for encoders shipped without a trained output head. A caller's own mark
    ``model._lensattr_logits_meaningful`` (lensattr never sets it) takes precedence."""
    mark = getattr(model, "_lensattr_logits_meaningful", None)
    if mark is not None:
        return bool(mark)
    return bool((_INFO.get(model) or {}).get("logits_meaningful", True))


def shared_probes(model: object) -> dict[Any, Any]:
    """The probe results of ``model`` shared by all its adapters (plain data only)."""
    return _PROBES.setdefault(model, dict)


def _plain(v: object) -> bool:
    """Plain data, which cannot reach a model (and so cannot keep one alive)."""
    if v is None or isinstance(v, (bool, int, float, str, bytes, Tensor, torch.dtype,
                                   torch.device)):
        return True
    if isinstance(v, (tuple, list, set, frozenset)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(_plain(k) and _plain(x) for k, x in v.items())
    return False


class ProbeStore(MutableMapping):
    """An adapter's view of its model's probe results: plain values are shared by every
    adapter of the model (:func:`shared_probes`), other values stay with this adapter (they
    may hold the model, which a shared entry must not). :meth:`renew` empties both when the
    weights changed since they were made."""

    def __init__(self, model: object):
        self.shared = shared_probes(model)
        self.local: dict[Any, Any] = {}
        self._local_weights: str | None = None

    def renew(self, weights: str) -> None:
        """Forget what was probed for other weights than ``weights`` (a weights hash)."""
        if self.shared.get("_weights") != weights:
            memo = self.shared.get("_weights_memo")
            self.shared.clear()
            self.shared.update({"_weights": weights, "_weights_memo": memo})
        if self._local_weights != weights:
            self.local.clear()
            self._local_weights = weights

    def __getitem__(self, key):
        if key in self.local:
            return self.local[key]
        return self.shared[key]

    def __setitem__(self, key, value) -> None:
        if _plain(value):
            self.local.pop(key, None)
            self.shared[key] = value
        else:
            self.shared.pop(key, None)
            self.local[key] = value

    def __delitem__(self, key) -> None:
        if key not in self.local and key not in self.shared:
            raise KeyError(key)
        self.local.pop(key, None)
        self.shared.pop(key, None)

    def __iter__(self) -> Iterator:
        yield from self.local
        yield from (k for k in self.shared if k not in self.local)

    def __len__(self) -> int:
        return len(self.local) + sum(k not in self.local for k in self.shared)

    def clear(self) -> None:
        self.local.clear()
        self.shared.clear()
        self._local_weights = None
