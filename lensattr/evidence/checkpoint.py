"""Evidence results keyed by what produced them, in memory and in a checkpoint file.

Every entry is named ``v/<run key>/<intervention digest>`` (per-prompt metric values) or
``d/<run key>/<intervention digest>`` (per-head output changes). The run key fingerprints the
model's config and weights, the prompts, the metric and the engine's parameters (for a patching
sweep also its method, direction, site, forward path and sender: ``PATCH_COMPONENTS``); the
intervention digest fingerprints what the intervention does (:func:`.interventions.digest`).
A label never keys anything, so a result can only be handed back for the same intervention of
the same run. Entries of other runs are kept, in memory and in the file: a checkpoint of
another run just gives no hits, and the first such load says which component differs.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .interventions import digest

__all__ = ["EvidenceStore", "RUN_COMPONENTS", "PATCH_COMPONENTS"]

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


class EvidenceStore:
    """Results of one run (``parts``: component -> fingerprint), optionally backed by a
    safetensors file that also holds, untouched, the results of other runs."""

    def __init__(self, parts: dict[str, str], path: str | Path | None = None):
        missing = set(RUN_COMPONENTS) - set(parts)
        if missing:
            raise ValueError(f"run key: missing components {sorted(missing)}")
        unknown = set(parts) - set(_LABELS)
        if unknown:
            raise ValueError(f"run key: unknown components {sorted(unknown)}")
        self.parts = dict(parts)
        self.run_key = digest(self.parts)[:16]
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, Tensor] = {}
        self.runs: dict[str, dict] = {}  # run key -> its parts, for every run in the file
        self.reason: str | None = None  # why a checkpoint on disk gave no hits, if it did not
        if self.path is not None and self.path.exists():
            self._load(self.path)

    # ---- entries -----------------------------------------------------------------------
    def get(self, key: str, with_delta: bool) -> tuple[Tensor, Tensor | None] | None:
        """Saved values (and head deltas when ``with_delta``) of intervention ``key``."""
        v = self.entries.get(f"v/{self.run_key}/{key}")
        d = self.entries.get(f"d/{self.run_key}/{key}")
        if v is None or (with_delta and d is None):
            return None
        return v, (d if with_delta else None)

    def put(self, key: str, values: Tensor, delta: Tensor | None = None) -> None:
        self.entries[f"v/{self.run_key}/{key}"] = values.detach().cpu().contiguous()
        if delta is not None:
            self.entries[f"d/{self.run_key}/{key}"] = delta.detach().cpu().contiguous()

    def __len__(self) -> int:
        """Entries of this run."""
        return sum(1 for k in self.entries if k.startswith(f"v/{self.run_key}/"))

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

    def _load(self, path: Path) -> None:
        """Read the file at ``path`` (this store's ``path``)."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                entries = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # any unreadable file is set aside, never lost
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            path.replace(aside)
            self.reason = f"unreadable ({type(err).__name__}: {err}); moved to {aside}"
            warnings.warn(f"checkpoint {self.path}: {self.reason}; starting afresh",
                          stacklevel=4)
            return
        self.entries = entries
        if meta.get("format") == FORMAT:
            self.runs = json.loads(meta.get("runs", "{}"))
        if len(self) == 0 and entries:
            self.reason = self._why_not(meta)
            warnings.warn(f"checkpoint {self.path}: no saved result is reused: {self.reason}. "
                          "Its entries stay in the file; new results are saved beside them.",
                          stacklevel=4)

    def _why_not(self, meta: dict) -> str:
        if meta.get("format") != FORMAT:
            return (f"it was written by an older lensattr that keyed results by label, which "
                    f"cannot tell interventions apart ({len(self.entries)} entries)")
        if not self.runs:
            return "it records no run"

        def differs(parts):
            return [c for c in _LABELS if parts.get(c) != self.parts.get(c)]

        closest = min(self.runs.values(), key=lambda parts: len(differs(parts)))
        bad = differs(closest)
        detail = "; ".join(
            f"{_LABELS[c]}: saved {closest.get(c)}, now {self.parts.get(c)}" for c in bad
        )
        n = len(self.runs)
        return (f"it holds results of {n} other run{'s' if n > 1 else ''}; the closest differs "
                f"in {', '.join(_LABELS[c] for c in bad)} ({detail})")
