"""The two runs of a patching experiment and the batched forward that patches one into the other.

A patching experiment has a *base* run (the run patched into) and a *source* run (the run
patched from): denoising patches the clean run's activations into the corrupted run (base =
corrupted, TransformerLens's convention), noising the corrupted run's into the clean run.

:class:`PatchRuns` caches both runs' activations and evaluates *cells*: one cell replaces, at one
site of one layer, some heads' activations at some positions by given source activations, on
every prompt. Many cells run in one forward pass, stacked along the batch (row ``k * n + i`` is
cell ``k`` on prompt ``i``). Where the hook-free forward reproduces the bridge
(:class:`~lensattr.evidence.bare.BareForward`, causal decoders), each forward starts at the
cell's layer from the cached base residual and runs only positions from the first patched one
on, attending to cached keys and values before it; elsewhere (encoders, metrics reading all
logits) the bridge runs the whole forward with the same edits as hooks.

Chunks and checkpoints (:mod:`.patch_chunks`): ``batch_size`` rows and ``memory_budget`` bytes
bound each forward; with a checkpoint store every finished cell is saved after each forward,
and cells already saved for the same run are read back instead of run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..core.distributed import assign, exchange, world
from ..core.metric import MetricError, check_metric_output
from ..core.metrics import as_metric
from ..core.prompts import PromptSet
from ..core.sites import Site
from ..core.version import __version__
from ..models import blocks
from ..models.adapter import Adapter, ModelError
from .bare import BareForward
from .checkpoint import EvidenceStore
from .interventions import digest
from .metric_rows import check_finite_metric
from .patch_chunks import check_budget, plan_chunks, row_positions
from .patch_edits import edit, watch_row
from .run_identity import metric_identity, prompts_digest

__all__ = ["PatchRuns", "Cell", "DIRECTIONS"]

DIRECTIONS = ("denoising", "noising")
_SITES = (Site.Z, Site.Q, Site.K, Site.V, Site.PATTERN, Site.RESID_PRE, Site.RESID_MID)
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Cell:
    """One patch: at ``site`` of ``layer``, head ``head`` (a key/value head for K and V), query
    position ``dest`` (None: every position) and, for patterns, key position ``src`` (None:
    every key) take the source activation. ``watch``: a query head whose attention row at the
    read position is recorded (None: none)."""

    site: Site
    layer: int
    head: int
    dest: int | None = None
    src: int | None = None
    watch: int | None = None


class PatchRuns:
    """Base and source runs of one prompt set, and batched patched forwards between them."""

    def __init__(self, model, prompts: PromptSet, metric, direction: str = "denoising", *,
                 fast: bool = True, batch_size: int = 256, memory_budget: int | None = None):
        self.adapter = a = model if isinstance(model, Adapter) else Adapter(model)
        a.one_device("patching")
        if not isinstance(prompts, PromptSet):
            raise ValueError("prompts: expected a lensattr.PromptSet, got "
                             f"{type(prompts).__name__}")
        if prompts.corrupted is None:
            raise ValueError("prompts: patching needs corrupted prompts (PromptSet(corrupted=...)) "
                             "of the same shape as the clean tokens")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.memory_budget = check_budget(memory_budget)
        prompts.validate_vocab(a.d_vocab)
        prompts.validate_length(getattr(a.cfg, "n_ctx", None))
        prompts.validate_tokenizer(getattr(a.model, "tokenizer", None), a.name)
        self.prompts, self.direction, self.batch_size = prompts, direction, int(batch_size)
        self.metric = as_metric(metric)
        corrupted = prompts.corrupted_view()
        # TL's convention: the metric reads the same positions and answers on every run
        self.base_view, self.source_view = ((corrupted, prompts) if direction == "denoising"
                                            else (prompts, corrupted))
        self.readout = self.metric.readout(self.base_view)
        self.n = len(prompts)
        with torch.no_grad():
            self.base_raw, self.base_acts = self._capture(self.base_view)
            self.source_raw, self.source_acts = self._capture(self.source_view)
        self.clean_raw = self.source_raw if direction == "denoising" else self.base_raw
        self.base = self._metric(self.base_raw, self.base_view, self.clean_raw)
        self.source = self._metric(self.source_raw, self.base_view, self.clean_raw)
        self.bare: BareForward | None = None
        self.path_reason: str | None = "fast=False"
        if fast:
            self.bare, self.path_reason = self._make_bare()
        self.n_forwards = 0
        self.n_skipped = 0  # rows whose patch changed nothing: the base run's value, exactly
        self.n_reused = 0  # cells read back from a checkpoint instead of run

    # ---- reference runs ----------------------------------------------------------------
    def _capture(self, view: PromptSet):
        """The readout and the activations at ``_SITES`` of one run (one forward)."""
        a, store = self.adapter, dict[tuple[Site, int | None], Tensor]()
        raw = a.read(view.tokens, view.attention_mask, self.readout,
                     a.capture_hooks(_SITES, store))
        return raw, store

    def _make_bare(self) -> tuple[BareForward | None, str | None]:
        a, view = self.adapter, self.base_view
        if self.readout.kind not in ("columns", "logits"):
            return None, f"the metric reads {self.readout.kind!r}, not logits at one position"
        if not a.is_causal:
            return None, "not a causal decoder"
        if not a._fast_readout_ok(view.tokens, view.attention_mask):
            return None, "the unembedding is not the plain final norm -> W_U"
        try:
            bare = BareForward(a, view.tokens, view.attention_mask, self.readout)
        except ModelError as e:
            return None, str(e)
        if not bare.check(self.base_raw, self.first_read):
            return None, bare.reason
        return bare, None

    @property
    def path(self) -> str:
        """``"bare"`` (the hook-free forward) or ``"bridge"`` (see ``path_reason``)."""
        return "bare" if self.bare is not None else "bridge"

    @property
    def first_read(self) -> int:
        """The first position any prompt's metric reads (the whole row when it reads all)."""
        pos = self.readout.positions
        return 0 if pos is None else int(pos.min())

    def _metric(self, raw: Tensor, view: PromptSet, clean: Tensor) -> Tensor:
        if not torch.isfinite(raw.float()).all():
            raise MetricError("model output: NaN or inf in what the metric reads; check the "
                              "model's weights, inputs and patches")
        out = check_metric_output(self.metric.compute(raw.float(), view, clean.float()),
                                  raw.shape[0], self.metric.name).detach().cpu()
        check_finite_metric(out, self.metric.name)
        return out

    def meta(self, method: str, **params) -> dict:
        a = self.adapter
        return {
            "model": a.name, "config": a.config_hash(), "prompts": prompts_digest(self.prompts),
            "n_prompts": self.n, "metric": self.metric.describe(),
            "metric_digest": digest(metric_identity(self.metric)), "method": method,
            "direction": self.direction, "path": self.path, "path_reason": self.path_reason,
            "lensattr_version": __version__, **params,
        }

    # ---- patched forwards ----------------------------------------------------------------
    def reach(self, cell: Cell) -> tuple[int, int]:
        """(first layer, first position) a cell can change; the read positions included."""
        first = self.first_read
        if cell.site == Site.RESID_FINAL:
            return self.adapter.n_layers, first
        return cell.layer, min(first, 0 if cell.dest is None else cell.dest)

    def run(self, cells: list[Cell], sources: dict | None = None, progress=None,
            store: EvidenceStore | None = None) -> tuple[Tensor, Tensor | None]:
        """Metric per prompt of each cell, [cell, batch] (CPU), and, where cells ``watch`` a
        head, its attention row at the read position [cell, batch, key_pos] (else None).
        ``sources``: (site, layer) -> [batch, ...] activations to patch in (default the source
        run's); the store's run key must identify them. ``store``: a checkpoint
        (:func:`.patch_chunks.open_store`): cells saved there are read back, the others saved
        as soon as their last forward is done."""
        sources = self.source_acts if sources is None else sources
        for c in cells:
            if (c.site, c.layer) not in sources:
                raise ValueError(f"cells: no source activation for {c.site.value} in layer "
                                 f"{c.layer}")
        n = self.n
        values = torch.full((len(cells), n), float("nan"))
        rows = torch.full((len(cells), n, self.prompts.n_pos), float("nan"))
        keys = [digest(c) for c in cells] if store is not None else []
        units = _units(plan_chunks(self, cells, list(range(len(cells)))))  # budget checked
        w = world()
        owners = assign([self._unit_cost(cells, u) for u in units], w.size)
        mine = [u for u, r in zip(units, owners, strict=True) if r == w.rank]
        counts = (self.n_forwards, self.n_skipped, self.n_reused)
        for unit in mine:
            # cells saved by an earlier run are read back (after an interruption, whole units;
            # a part of one only when the cells or batch size changed since)
            saved = {k: store.get(keys[k], cells[k].watch is not None) for k in unit[0][0]
                     } if store is not None else {}
            for k, hit in saved.items():
                if hit is not None:
                    values[k] = hit[0]
                    if hit[1] is not None:
                        rows[k] = hit[1]
            todo = [k for k in unit[0][0] if saved.get(k) is None]
            self.n_reused += len(unit[0][0]) - len(todo)
            for _, part in (unit if todo else []):
                v, wr = self._forward([cells[k] for k in todo], sources, part)
                values[todo, part] = v
                if wr is not None:
                    rows[todo, part] = wr
            if store is not None and todo:
                for k in todo:
                    store.put(keys[k], values[k], rows[k] if cells[k].watch is not None else None)
                store.save()
            if progress is not None:
                progress.update(len(unit[0][0]))
        if w.sharded:
            self._swap(mine, values, rows, counts, progress, store is not None)
        watched = any(c.watch is not None for c in cells)
        return values, rows if watched else None

    def _unit_cost(self, cells: list[Cell], unit: list[tuple[list[int], slice]]) -> float:
        """Positions run by one unit (a chunk, or the prompt parts of one cell): its cost."""
        return float(sum(len(ks) * len(range(*part.indices(self.n)))
                         * row_positions(self, cells[ks[0]]) for ks, part in unit))

    def _swap(self, mine, values: Tensor, rows: Tensor, counts: tuple[int, int, int],
              progress, saved: bool) -> None:
        """Send this rank's cells to the others and take theirs; the counts of forwards,
        skipped rows and reused cells become the sums over the ranks."""
        ks = [k for unit in mine for k in unit[0][0]]
        done = (self.n_forwards - counts[0], self.n_skipped - counts[1],
                self.n_reused - counts[2])
        hint = ("every rank's checkpoint file holds the cells it finished: rerun to resume"
                if saved else "no checkpoint was given: pass one to resume")
        got = exchange((ks, values[ks], rows[ks], done), f"{len(values)} patching cells", hint)
        for r, (theirs, v, wr, (f, sk, re)) in enumerate(got):
            if r == world().rank:
                continue
            values[theirs], rows[theirs] = v, wr
            self.n_forwards, self.n_skipped = self.n_forwards + f, self.n_skipped + sk
            self.n_reused += re
            if progress is not None:
                progress.update(len(theirs))

    def _forward(self, cells: list[Cell], sources: dict, part: slice = slice(None)):
        """Values [cell, prompt] (and watched rows) of ``cells`` on the prompts in ``part``."""
        dev = self.adapter.device
        c0 = cells[0]
        sub = torch.arange(self.n, device=_CPU)[part]
        n = len(sub)
        idx = sub.repeat(len(cells))  # row r -> prompt sub[r % n]
        src = sources[(c0.site, c0.layer)][idx.to(sources[(c0.site, c0.layer)].device)].to(dev)
        mask = torch.zeros(src.shape[:-1] if c0.site != Site.PATTERN else src.shape,
                           dtype=torch.bool, device=_CPU)
        for k, c in enumerate(cells):
            rows = slice(k * n, (k + 1) * n)
            d = slice(None) if c.dest is None else c.dest
            if c.site == Site.PATTERN:  # [rows, head, query_pos, key_pos]
                mask[rows, c.head, d, slice(None) if c.src is None else c.src] = True
            elif c.site == Site.RESID_FINAL:  # an additive source: every row takes it
                mask[rows] = True
            else:  # [rows, pos, head, d_head]
                mask[rows, d, c.head] = True
        mask = mask.to(dev)
        if not any(c.watch is not None for c in cells):
            # rows whose patch replaces nothing by anything new are the unpatched base run
            keep = self._changes(c0, idx, mask, src)
            if not keep.all():
                out = self.base[idx].clone()
                self.n_skipped += int((~keep).sum())
                if keep.any():
                    kept = keep.cpu()
                    out[kept] = self._run_rows(c0, cells, idx[kept], mask[keep], src[keep], n)[0]
                return out.reshape(len(cells), n), None
        return self._run_rows(c0, cells, idx, mask, src, n)

    def _changes(self, c0: Cell, idx: Tensor, mask: Tensor, src: Tensor) -> Tensor:
        """[rows] does the patch change any activation of the row (exactly)?"""
        if c0.site == Site.RESID_FINAL:  # an additive change
            return ((src != 0).any(-1) & mask).flatten(1).any(1)
        base = self.base_acts[(c0.site, c0.layer)]
        diff = base[idx.to(base.device)].to(src.device) != src
        if c0.site != Site.PATTERN:
            diff = diff.any(-1)
        return (diff & mask).flatten(1).any(1)

    def _run_rows(self, c0: Cell, cells: list[Cell], idx: Tensor, mask: Tensor, src: Tensor,
                  n: int | None = None):
        """The forward of rows ``idx`` (prompt of each row) with their masks and sources;
        ``n`` prompts per cell (default all)."""
        a, dev = self.adapter, self.adapter.device
        n = self.n if n is None else n
        R = idx.shape[0]
        hooks = {(c0.site, c0.layer if c0.site != Site.RESID_FINAL else None):
                 edit(c0.site, mask, src)}
        watch = None
        if any(c.watch is not None for c in cells):
            heads = torch.tensor([c.watch if c.watch is not None else 0 for c in cells])
            read = cast(Tensor, self.readout.positions)[idx].to(dev)
            watch = torch.full((R, self.prompts.n_pos), float("nan"), device=dev)
            inner = hooks.get((Site.PATTERN, c0.layer))
            heads = heads.repeat_interleave(n).to(dev)  # [rows]
            hooks[(Site.PATTERN, c0.layer)] = watch_row(inner, heads, read, watch)
        readout = self.readout.take(idx)
        if self.bare is not None and c0.site == Site.Z and watch is None:
            first = self.reach(c0)[1]  # the residual after the patched layer, then on
            x = self._after_z(c0.layer, idx, mask, src, first)
            raw = self.bare.run(idx, c0.layer + 1, first, {}, readout, resid=x,
                                last_read_only=True)
        elif self.bare is not None:
            layer, first = self.reach(c0)
            raw = self.bare.run(idx, layer, first, hooks, readout, last_read_only=True)
        else:
            view = self.base_view.take(idx)
            bridge: dict = {k: (lambda x, _f=f: _f(x, 0)) for k, f in hooks.items()}
            raw = a.read(view.tokens, view.attention_mask, readout, bridge)
        self.n_forwards += 1
        out = self._metric(raw, self.base_view.take(idx), self.clean_raw[idx])
        w = None if watch is None else watch.cpu().reshape(len(cells), n, -1)
        return out.reshape(-1, n) if R == len(cells) * n else out, w

    def _after_z(self, layer: int, idx: Tensor, mask: Tensor, src: Tensor, p0: int) -> Tensor:
        """The residual leaving block ``layer`` at positions ``p0..`` [rows, q, d_model] when the
        heads in ``mask`` [rows, pos, head] output ``src``: the cached base residual, except at
        patched positions, where the change (src - base) @ W_O is added after attention and the
        MLP recomputed on it (only those positions change in this layer)."""
        bare, dev = self.bare, src.device
        assert bare is not None  # only on the hook-free path
        w = bare.layers[layer]
        m = mask[:, p0:]  # [rows, q, head]
        base_z = self.base_acts[(Site.Z, layer)].to(dev)[idx.to(dev), p0:]
        dz = torch.where(m[..., None], src[:, p0:] - base_z, 0.0)  # [rows, q, head, d_head]
        D = blocks.head_out(dz, self.adapter.W_O(layer))  # [rows, q, d_model]
        out = bare.resid[layer + 1] if layer + 1 < self.adapter.n_layers else bare.resid_final
        x = out[idx.to(dev), p0:].clone()  # [rows, q, d_model]
        sel = m.any(-1)  # [rows, q]: positions where some head is patched
        if not sel.any():
            return x
        if w.parallel:  # the MLP reads the block input, which is unchanged
            x[sel] = x[sel] + D[sel]
            return x
        mid = self.base_acts[(Site.RESID_MID, layer)].to(dev)[idx.to(dev), p0:][sel] + D[sel]
        x[sel] = blocks.add_mlp(w, mid[None])[0]  # [k, d_model]
        return x


def _units(plan: list[tuple[list[int], slice]]) -> list[list[tuple[list[int], slice]]]:
    """The planned forwards grouped into units one rank runs whole: a chunk of cells, or every
    prompt part of one cell (the cell is saved when its last part is done)."""
    out: list[list[tuple[list[int], slice]]] = []
    for chunk, part in plan:
        if out and out[-1][0][0] == chunk and part.start != 0:
            out[-1].append((chunk, part))
        else:
            out.append([(chunk, part)])
    return out
