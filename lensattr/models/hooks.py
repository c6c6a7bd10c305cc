"""Hook functions as the adapter runs them: chaining (:func:`after`), stopping a forward pass
early, and wrapping for TransformerLens (which passes the HookPoint too)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..core.sites import Site

__all__ = ["HookFn", "Hooks", "after", "StopForward", "wrap"]

HookFn = Callable[[Tensor], Tensor | None]
Hooks = dict[tuple[Site, int | None], HookFn]  # hook functions by (site, layer)


def after(inner: HookFn | None, fn: Callable[[Tensor], None]) -> HookFn:
    """A hook that runs ``inner`` (the hook already on that site, if any), then ``fn`` on the
    activation it leaves (to save it, or to stop the forward), and passes that on."""

    def hook(x):
        if inner is not None:
            out = inner(x)
            x = x if out is None else out
        fn(x)
        return x

    return hook


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (hooks are removed by the context)."""


def wrap(fn: HookFn):
    """``fn`` as a TransformerLens forward hook."""

    def hook(tensor, hook=None):  # TransformerLens passes the HookPoint as ``hook``
        return fn(tensor)

    return hook
