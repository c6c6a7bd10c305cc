"""Work shared by the ranks of a ``torch.distributed`` process group (``torchrun``).

Nothing here schedules. Every rank runs the same program on the same inputs and plans the same
work list. Each rank takes its share (:func:`assign`: deterministic, balanced by cost). After
each list the ranks swap what they computed (:func:`exchange`), so every rank holds every result
and goes on identically. Without an initialised process group, or with one rank, nothing changes.

The swap runs on a gloo group: the default group when it is gloo, else a gloo group made beside
it (NCCL groups move GPU tensors; the evidence is small and on the CPU). A
``monitored_barrier`` comes first, so a rank that stopped (killed, crashed, out of memory) is
named in a :class:`RankFailure` instead of surfacing as a socket error from deep in gloo.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["World", "world", "assign", "exchange", "barrier", "shared", "init_from_env",
           "finish", "RankFailure"]


class RankFailure(RuntimeError):
    """A rank of the process group stopped before the ranks swapped their results."""

    def __init__(self, message: str, ranks: list[int] | None = None):
        super().__init__(message)
        self.ranks = ranks or []


@dataclass(frozen=True)
class World:
    """This process's place in the process group: ``rank`` of ``size`` (0 of 1 alone)."""

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def sharded(self) -> bool:
        return self.size > 1

    @property
    def lead(self) -> bool:
        """Rank 0 (or alone): the rank that shows progress and writes results."""
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.size, "backend": self.backend}


def world() -> World:
    """The current process group's rank and size; rank 0 of 1 when none is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def assign(costs: list[float], size: int) -> list[int]:
    """The rank that owns each item: the costliest item first, to the least-loaded rank (ties
    to the lower index and rank). The same costs give the same owners on every rank."""
    if size < 1:
        raise ValueError(f"size: expected a positive number of ranks, got {size}")
    load = [0.0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


_GROUPS: dict[int, Any] = {}


def _cpu_group():
    """A gloo group over every rank (the default group when it is gloo), made once."""
    import torch.distributed as dist

    default = dist.group.WORLD
    if str(dist.get_backend()) == "gloo":
        return default
    if id(default) not in _GROUPS:  # every rank gets here in the same order (first exchange)
        _GROUPS[id(default)] = dist.new_group(backend="gloo")
    return _GROUPS[id(default)]


def exchange(payload: Any, what: str, hint: str = "") -> list[Any]:
    """Every rank's ``payload`` (picklable), in rank order, on every rank. ``what`` names the
    work in errors; ``hint`` says how to resume. A rank that stopped is a :class:`RankFailure`
    naming it."""
    w = world()
    if not w.sharded:
        return [payload]
    import torch.distributed as dist

    group = _cpu_group()
    out: list[Any] = [None] * w.size
    _SEQ[0] += 1  # the same on every rank: every rank makes the same exchanges in order
    arrived = _arrive(w, _SEQ[0])
    try:
        dist.monitored_barrier(group=group, wait_all_ranks=True)
        dist.all_gather_object(out, payload, group=group)
    except RuntimeError as err:
        raise _failure(w, err, what, hint, arrived) from err
    return out


_SEQ = [0]


def _arrive(w: World, seq: int) -> Callable[[], list[int]] | None:
    """Mark this rank's arrival at exchange ``seq`` in the process group's store; returns how
    to list the ranks that have not arrived (None where the store cannot be reached)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        store.set(f"lensattr/exchange{seq}/{w.rank}", "1")
    except Exception:  # a group without a reachable store: the ranks go unnamed
        return None

    def missing() -> list[int]:
        try:
            return [r for r in range(w.size)
                    if r != w.rank and not store.check([f"lensattr/exchange{seq}/{r}"])]
        except Exception:  # the store went down with the rank that hosted it
            return []

    return missing


def barrier(what: str, hint: str = "") -> None:
    """Wait for every rank (no-op alone); a rank that stopped is a :class:`RankFailure`."""
    exchange(None, what, hint)


_FAILED = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")


def _failure(w: World, err: RuntimeError, what: str, hint: str,
             arrived: Callable[[], list[int]] | None = None) -> RankFailure:
    """The error of an exchange that failed, naming the ranks that stopped: those gloo's
    monitored barrier names, else those that never arrived, else (the only other rank, or on
    ranks > 0, which report to rank 0 alone) rank 0 or the other rank."""
    text = str(err)
    found = _FAILED.search(text)
    if found:
        ranks = sorted(int(x) for x in re.findall(r"\d+", found.group(1)))
    else:
        ranks = arrived() if arrived is not None else []
        if not ranks and w.size == 2:
            ranks = [1 - w.rank]
        elif not ranks and w.rank != 0:
            ranks = [0]
    who = (f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}" if ranks
           else "another rank")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    msg = (f"rank {w.rank} of {w.size}: {who} stopped (killed, crashed or out of memory: its own "
           f"log says why) before the ranks exchanged {what}. {hint}".strip()
           + f" [{first[:300]}]")
    return RankFailure(msg, ranks)


def shared(n: int, compute: Callable[[int], Any], what: str,
           costs: list[float] | None = None) -> list[Any]:
    """``[compute(i) for i in range(n)]``, each ``i`` computed by one rank (:func:`assign` on
    ``costs``, default equal) and the results swapped, so every rank gets the whole list.
    ``compute`` must not depend on which rank runs it, nor on what ran before it."""
    w = world()
    if not w.sharded:
        return [compute(i) for i in range(n)]
    owners = assign(costs if costs is not None else [1.0] * n, w.size)
    mine = {i: compute(i) for i in range(n) if owners[i] == w.rank}
    out: dict[int, Any] = {}
    for got in exchange(mine, what):
        out.update(got)
    return [out[i] for i in range(n)]


def init_from_env(device: str | None = None) -> World:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``
    above 1, with ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL when ``device`` is CUDA,
    else gloo. Alone (no ``WORLD_SIZE``, or 1) or already joined, nothing is done."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size > 1 and dist.is_available() and not dist.is_initialized():
        cuda = device is not None and str(device).startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
    return world()


def finish() -> None:
    """Leave the process group joined by :func:`init_from_env` (no-op when none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
