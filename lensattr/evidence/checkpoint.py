"""Evidence results keyed by what produced them, in memory and in a checkpoint file.

Every entry is named ``v/<run key>/<intervention digest>`` (per-prompt metric values) or
``m/<run key>/<intervention digest>`` (per-head output changes averaged over the prompts,
``[layer, head]``; the per-prompt ``d/`` entries that earlier versions wrote are not read, so
those are tracked again). The run key fingerprints the model's config and weights, the
prompts, the metric and the engine's parameters (for a patching sweep also its method,
direction, site, forward path and sender: ``PATCH_COMPONENTS``); the intervention digest
fingerprints what the intervention does (:func:`.interventions.digest`).
A label never keys anything, so a result can only be handed back for the same intervention of
the same run. Entries of other runs are kept, in memory and in the file: a checkpoint of
another run just gives no hits, and the first such load says which component differs.

Ranks (:mod:`lensattr.core.distributed`): rank 0 (and a process alone) writes the file itself,
rank ``r > 0`` writes ``<stem>.rank<r><suffix>`` beside it (:func:`rank_file`), each holding
what that rank computed. Every store reads all of them (:func:`checkpoint_files`), whatever
world size wrote them, so a rerun with any number of ranks reuses every saved result.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..core.distributed import world
from .interventions import digest

__all__ = ["EvidenceStore", "RUN_COMPONENTS", "PATCH_COMPONENTS", "rank_file", "checkpoint_files"]

FORMAT = "lensattr-evidence/2"
# the components of a run key, as named in warnings
RUN_COMPONENTS = {
    "config": "model config",
    "weights": "model weights",
    "prompts": "prompts",
    "metric": "metric",
    "engine": "engine parameters",
}
# further components a run key may have (patching sweeps, :mod:`.patch_chunks`)
PATCH_COMPONENTS = {
    "method": "method",
    "direction": "direction",
    "site": "site",
    "path": "forward path",
    "sender": "sender",
}
_LABELS = {**RUN_COMPONENTS, **PATCH_COMPONENTS}


def rank_file(path: str | Path, rank: int) -> Path:
    """The file rank ``rank`` writes for checkpoint ``path``: ``path`` itself for rank 0, else
    ``<stem>.rank<rank><suffix>`` beside it."""
    path = Path(path)
    if rank == 0:
        return path
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def checkpoint_files(path: str | Path) -> list[Path]:
    """Every existing file of checkpoint ``path``: itself and the files of its ranks > 0."""
    path = Path(path)
    own = re.compile(re.escape(path.stem) + r"\.rank[1-9]\d*" + re.escape(path.suffix) + r"\Z")
    ranks = sorted(p for p in path.parent.glob(f"{path.stem}.rank*{path.suffix}")
                   if own.match(p.name)) if path.parent.is_dir() else []
    return [p for p in [path, *ranks] if p.is_file()]


class EvidenceStore:
    """Results of one run (``parts``: component -> fingerprint), optionally backed by a
    safetensors file that also holds, untouched, the results of other runs. ``rank``: the
    rank whose file this store writes (:func:`rank_file`; default this process's rank in the
    process group, 0 alone); the files of every rank are read."""

    def __init__(self, parts: dict[str, str], path: str | Path | None = None,
                 rank: int | None = None):
        missing = set(RUN_COMPONENTS) - set(parts)
        if missing:
            raise ValueError(f"run key: missing components {sorted(missing)}")
        unknown = set(parts) - set(_LABELS)
        if unknown:
            raise ValueError(f"run key: unknown components {sorted(unknown)}")
        self.parts = dict(parts)
        self.run_key = digest(self.parts)[:16]
        rank = world().rank if rank is None else rank  # this process's rank by default
        self.base = Path(path) if path is not None else None
        self.path = rank_file(path, rank) if path is not None else None
        self.entries: dict[str, Tensor] = {}  # this rank's file: written by save()
        self.known: dict[str, Tensor] = {}  # read from other ranks' files or sent by them
        self.runs: dict[str, dict] = {}  # run key -> its parts, for every run in the file
        self.reason: str | None = None  # why a checkpoint on disk gave no hits, if it did not
        self._meta: dict = {}  # metadata of the file the reason is worked out from
        self._n_other = 0  # entries in other ranks' files (of any run)
        if self.base is not None:
            for f in checkpoint_files(self.base):
                if f == self.path:
                    self._load(f)
                else:
                    self._load_other(f)
            self._check_hits()

    # ---- entries -----------------------------------------------------------------------
    def get(self, key: str, with_delta: bool) -> tuple[Tensor, Tensor | None] | None:
        """Saved values (and head deltas when ``with_delta``) of intervention ``key``."""
        v, d = (self.entries.get(f"{t}/{self.run_key}/{key}", self.known.get(
            f"{t}/{self.run_key}/{key}")) for t in "vm")
        if v is None or (with_delta and d is None):
            return None
        return v, (d if with_delta else None)

    def put(self, key: str, values: Tensor, delta: Tensor | None = None) -> None:
        self.entries[f"v/{self.run_key}/{key}"] = values.detach().cpu().contiguous()
        if delta is not None:
            self.entries[f"m/{self.run_key}/{key}"] = delta.detach().cpu().contiguous()

    def remember(self, key: str, values: Tensor, delta: Tensor | None = None) -> None:
        """A result another rank computed (and saved in its own file): kept in memory only."""
        self.known[f"v/{self.run_key}/{key}"] = values
        if delta is not None:
            self.known[f"m/{self.run_key}/{key}"] = delta

    def __len__(self) -> int:
        """Entries of this run (this rank's and the others')."""
        pre = f"v/{self.run_key}/"
        return len({k for k in [*self.entries, *self.known] if k.startswith(pre)})

    # ---- file --------------------------------------------------------------------------
    def save(self) -> None:
        """Write every entry (this run's and the others') atomically: a temp file, renamed."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        runs = {**self.runs, self.run_key: self.parts}
        meta = {"format": FORMAT, "runs": json.dumps(runs, sort_keys=True)}
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(self.entries, str(tmp), metadata=meta)
        tmp.replace(self.path)
        self.runs = runs

    def _read(self, path: Path) -> tuple[dict, dict] | None:
        """(entries, metadata) of the file at ``path``; an unreadable file is set aside."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                entries = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # any unreadable file is set aside, never lost
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            path.replace(aside)
            self.reason = f"unreadable ({type(err).__name__}: {err}); moved to {aside}"
            warnings.warn(f"checkpoint {path}: {self.reason}; starting afresh", stacklevel=5)
            return None
        return entries, meta

    def _load(self, path: Path) -> None:
        """Read this rank's own file: its entries are written back by :meth:`save`."""
        got = self._read(path)
        if got is None:
            return
        self.entries, meta = got
        self._meta = meta
        if meta.get("format") == FORMAT:
            self.runs = json.loads(meta.get("runs", "{}"))

    def _load_other(self, path: Path) -> None:
        """Read another rank's file: this run's entries are reused, nothing is written back."""
        got = self._read(path)
        if got is None:
            return
        entries, meta = got
        pre = (f"v/{self.run_key}/", f"m/{self.run_key}/")
        self.known.update({k: v for k, v in entries.items() if k.startswith(pre)})
        self._n_other += len(entries)
        if not self._meta:
            self._meta = meta

    def _check_hits(self) -> None:
        """Warn when the files hold entries but none of this run, saying why."""
        if len(self) == 0 and (self.entries or self._n_other):
            self.reason = self._why_not(self._meta)
            warnings.warn(f"checkpoint {self.base}: no saved result is reused: {self.reason}. "
                          "Its entries stay in the file; new results are saved beside them.",
                          stacklevel=4)

    def _why_not(self, meta: dict) -> str:
        if meta.get("format") != FORMAT:
            n = len(self.entries) + self._n_other
            return (f"it was written by an older lensattr that keyed results by label, which "
                    f"cannot tell interventions apart ({n} entries)")
        runs = self.runs or json.loads(meta.get("runs", "{}"))
        if not runs:
            return "it records no run"

        def differs(parts):
            return [c for c in _LABELS if parts.get(c) != self.parts.get(c)]

        closest = min(runs.values(), key=lambda parts: len(differs(parts)))
        bad = differs(closest)
        detail = "; ".join(
            f"{_LABELS[c]}: saved {closest.get(c)}, now {self.parts.get(c)}" for c in bad
        )
        n = len(runs)
        return (f"it holds results of {n} other run{'s' if n > 1 else ''}; the closest differs "
                f"in {', '.join(_LABELS[c] for c in bad)} ({detail})")
