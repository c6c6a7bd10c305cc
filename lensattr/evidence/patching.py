"""Activation patching and path patching of every attention head, batched and exact.

* :func:`activation_patching` - TransformerLens's ``get_act_patch_attn_head_{out,q,k,v,pattern}
  _{all_pos,by_pos}`` and ``..._pattern_dest_src_pos`` (the same numbers), with per-prompt
  values, effects with intervals and noising as well as denoising.
* :func:`path_patching` - one sender head's output patched along the path into later heads'
  query, key or value inputs, or into the logits, with everything else left at its base value
  (Wang et al. 2022); equal to TransformerLens's ``get_act_patch_direct_path``.

Both run many cells per forward pass and, on causal decoders, only the layers and positions a
patch can reach (:mod:`.patch_runs`). ``memory_budget`` (bytes of working memory per forward)
sizes the chunks; ``checkpoint`` (a safetensors file) saves every cell as soon as it is done, so
an interrupted sweep rerun with the same file computes only the cells it lacks
(:mod:`.patch_chunks`); ``progress`` shows a tqdm bar.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.config import RunConfig, run_options
from ..core.distributed import world
from ..core.prompts import PromptSet
from ..core.sites import Site
from ..core.types import HeadId
from ..models.adapter import Adapter, Hooks, ModelError
from .patch_chunks import open_store
from .patch_runs import Cell, PatchRuns
from .patching_result import ActivationPatching, PathPatching

__all__ = ["activation_patching", "path_patching", "PATCH_SITES", "PATCH_BY"]

PATCH_SITES = {"z": Site.Z, "out": Site.Z, "q": Site.Q, "k": Site.K, "v": Site.V,
               "pattern": Site.PATTERN}
PATCH_BY = ("all", "pos", "dest_src")


def _axes(site: Site, by: str) -> tuple[str, ...]:
    if site == Site.PATTERN:
        return {"all": ("layer", "head_index"), "pos": ("layer", "head_index", "dest_pos"),
                "dest_src": ("layer", "head_index", "dest_pos", "src_pos")}[by]
    if by == "dest_src":
        raise ValueError("by: 'dest_src' applies to site='pattern' only; use 'all' or 'pos'")
    return ("layer", "head") if by == "all" else ("layer", "pos", "head")


def activation_patching(
    model,
    prompts: PromptSet,
    metric,
    *,
    site: str = "z",
    by: str = "all",
    heads=None,
    direction: str = "denoising",
    fast: bool | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    memory_budget: int | None = None,
    run: RunConfig | None = None,
) -> ActivationPatching:
    """Patch each head's activation at ``site`` from the source run into the base run.

    site: ``"z"`` (alias ``"out"``: the head's output), ``"q"``, ``"k"``, ``"v"`` (per
        key/value head under grouped-query attention, as the bridge's hooks are) or
        ``"pattern"``.
    by: ``"all"`` every position at once; ``"pos"`` one position (patterns: one destination
        row); ``"dest_src"`` one (destination, source) entry of a pattern.
    heads: only these heads' cells (``(layer, head)`` query heads; for ``k``/``v`` the
        key/value heads they read); the others are NaN. Default every head.
    direction: ``"denoising"`` patches clean activations into the corrupted run (TL's
        convention), ``"noising"`` corrupted activations into the clean run.
    metric: a :class:`~lensattr.metrics.Metric` (e.g. ``LogitDiff()``) or a callable
        ``fn(logits [batch, pos, d_vocab], prompts) -> [batch]``; it reads the same positions
        and answers on every run.
    batch_size: rows (prompt x cell) per forward pass.
    memory_budget: bytes of working memory per forward pass (an estimate from the model's
        dimensions and dtype); chunks, down to parts of one cell's prompts, are sized to fit.
        A budget too small for one row (one prompt x one cell) is a ValueError naming the
        minimum.
    checkpoint: a safetensors file where each cell's values are saved after every forward; a
        rerun with the same file (same model weights, prompts, metric, direction, site, path)
        reads them back and runs only the missing cells. Results of other runs in the file are
        kept; a file holding none of this run warns which component differs.
    Under an initialised ``torch.distributed`` process group (``torchrun``) the ranks share the
    cells and every rank returns the whole result (see :func:`lensattr.audit`).
    Returns an :class:`ActivationPatching` (``values[*cells, batch]``, effects, ``to_frame``,
    ``to_transformer_lens``).
    """
    fast, batch_size, progress, checkpoint, memory_budget = _opts(
        run, fast=fast, batch_size=batch_size, progress=progress, checkpoint=checkpoint,
        memory_budget=memory_budget)
    if site not in PATCH_SITES:
        raise ValueError(f"site: expected one of {sorted(PATCH_SITES)}, got {site!r}")
    if by not in PATCH_BY:
        raise ValueError(f"by: expected one of {PATCH_BY}, got {by!r}")
    s = PATCH_SITES[site]
    axes = _axes(s, by)
    a = model if isinstance(model, Adapter) else Adapter(model)
    if s == Site.PATTERN and not a.pattern_editable:
        raise ModelError(f"site: model {a.name!r} computes attention inside its HF module, so "
                         "edits of hook_pattern are discarded; pattern patching is not possible")
    runs = PatchRuns(a, prompts, metric, direction, fast=fast, batch_size=batch_size,
                     memory_budget=memory_budget)
    if runs.bare is None and not _site_editable(a, s):
        raise ModelError(f"site: model {a.name!r} discards edits made at hook_{s.value}; "
                         "patch 'z' instead")
    n_heads = a.n_kv_heads if s in (Site.K, Site.V) else a.n_heads
    p = prompts.n_pos
    sizes = {"layer": a.n_layers, "head": n_heads, "head_index": n_heads, "pos": p,
             "dest_pos": p, "src_pos": p}
    shape = [sizes[x] for x in axes]
    group = a.n_heads // n_heads
    wanted = None if heads is None else {
        (layer, h // group) for layer, h in _head_list(a, heads, "heads")}
    cells, keep = [], []
    for i, ix in enumerate(itertools.product(*(range(k) for k in shape))):
        d = dict(zip(axes, ix, strict=True))
        head = d["head"] if "head" in d else d["head_index"]
        if wanted is not None and (d["layer"], head) not in wanted:
            continue
        keep.append(i)
        cells.append(Cell(s, d["layer"], head, dest=d.get("pos", d.get("dest_pos")),
                          src=d.get("src_pos")))
    with tqdm(total=len(cells), desc=f"patching {site}",
              disable=not progress or not world().lead,
              leave=False) as bar:
        store = open_store(runs, checkpoint, "activation_patching", s.value)
        values, _ = runs.run(cells, progress=bar, store=store)
    if wanted is not None:  # the cells not asked for are NaN
        full = torch.full((math.prod(shape), len(prompts)), float("nan"), dtype=values.dtype)
        full[torch.tensor(keep)] = values
        values = full
    extra = {} if wanted is None else {"heads": sorted(_head_list(a, heads, "heads"))}
    meta = runs.meta("activation_patching", site=s.value, by=by, seed=seed, **extra,
                     **_run_meta(runs, checkpoint))
    return ActivationPatching(s.value, axes, values.reshape(*shape, len(prompts)), runs.base,
                              runs.source, meta)


def _run_meta(runs: PatchRuns, checkpoint) -> dict:
    return {"n_forwards": runs.n_forwards, "n_reused": runs.n_reused,
            "memory_budget": runs.memory_budget,
            "checkpoint": None if checkpoint is None else str(checkpoint)}


def _site_editable(a: Adapter, site: Site) -> bool:
    """Do edits at ``site`` of layer 0 reach the head outputs on the bridge? (Zeroing the
    values must change hook_z; some encoders fire hooks after the fact.)"""
    if site in (Site.Z, Site.PATTERN):
        return True
    seen: dict[str, Tensor] = {}
    tokens = torch.zeros(1, 3, dtype=torch.long, device=a.device)
    tokens[0, 1:] = 1
    hooks: Hooks = {(site, 0): lambda x: x * 0 + 3.0, (Site.Z, 0): lambda z: seen.update(z=z)}
    a.forward(tokens, hooks=hooks)
    edited = seen["z"]
    a.forward(tokens, hooks={(Site.Z, 0): lambda z: seen.update(z=z)})
    return not torch.equal(edited, seen["z"])


_COMPONENTS = {"q": Site.Q, "k": Site.K, "v": Site.V}


def path_patching(
    model,
    prompts: PromptSet,
    metric,
    sender,
    *,
    receivers: tuple[str, ...] = ("q", "k", "v", "logits"),
    receiver_heads=None,
    direction: str = "denoising",
    fast: bool | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    memory_budget: int | None = None,
    run: RunConfig | None = None,
) -> PathPatching:
    """Path patching from ``sender`` (a :class:`~lensattr.types.HeadId`): its output's change
    (source run minus base run, ``z @ W_O`` at every position) is added to one receiver's input
    only - the residual read by a later head's query, key or value projection (``q``/``k``/
    ``v``; the receiver's norm is recomputed on it), or the final residual read by the
    unembedding (``logits``, final norm recomputed). Every other component reads the base run's
    residual: the path is direct (not through intermediate heads or MLPs). Everything after
    the receiver is recomputed, as in Wang et al. (2022) and TransformerLens's
    ``get_act_patch_direct_path``. Receivers ``k``/``v`` are key/value heads under
    grouped-query attention. Returns a :class:`PathPatching` with the metric per receiver and
    prompt, and the change of each receiver's attention row at the read position.
    ``receiver_heads``: only these receivers (``(layer, head)`` query heads, each in a layer
    after the sender's; for ``k``/``v`` the key/value heads those query heads read), the others
    are NaN; default every head after the sender. ``batch_size``, ``memory_budget``,
    ``checkpoint`` and ``progress`` as in :func:`activation_patching` (the checkpoint's run key
    includes the sender; the watched attention rows are saved with the values).
    """
    fast, batch_size, progress, checkpoint, memory_budget = _opts(
        run, fast=fast, batch_size=batch_size, progress=progress, checkpoint=checkpoint,
        memory_budget=memory_budget)
    a = model if isinstance(model, Adapter) else Adapter(model)
    sender = a.check_head(sender, "sender")
    if isinstance(receivers, str):
        receivers = (receivers,)
    bad = [r for r in receivers if r not in ("q", "k", "v", "logits")]
    if bad or not receivers:
        raise ValueError(f"receivers: expected a non-empty subset of ('q', 'k', 'v', 'logits'), "
                         f"got {receivers!r}")
    if not a.has_direct_path:
        raise ModelError(f"model {a.name!r}: path patching needs a pre-norm causal decoder "
                         "(each head's output added to the residual stream as z @ W_O)")
    wanted = _receiver_heads(a, receiver_heads, sender)
    runs = PatchRuns(a, prompts, metric, direction, fast=fast, batch_size=batch_size,
                     memory_budget=memory_budget)
    n, p, L, H = len(prompts), prompts.n_pos, a.n_layers, a.n_heads
    Ls, hs = sender
    W_O = a.W_O(Ls)[hs]  # [d_head, d_model]
    z_src = runs.source_acts[(Site.Z, Ls)][:, :, hs]  # [batch, pos, d_head]
    z_base = runs.base_acts[(Site.Z, Ls)][:, :, hs]
    delta = (z_src - z_base) @ W_O  # [batch, pos, d_model]
    comps = tuple(r for r in receivers if r != "logits")
    values = torch.full((len(comps), L, H, n), float("nan"))
    change = torch.full((len(comps), L, H, n, p), float("nan"))
    cells, sources, where = [], {}, []
    for c, comp in enumerate(comps):
        site = _COMPONENTS[comp]
        n_rec = a.n_kv_heads if comp in ("k", "v") else H
        group = H // a.n_kv_heads if comp in ("k", "v") else 1
        for layer in range(Ls + 1, L):
            heads = [h for h in range(n_rec) if wanted is None
                     or any((layer, q) in wanted for q in range(h * group, (h + 1) * group))]
            if heads:
                sources[(site, layer)] = _patched_input(a, runs, layer, site, delta)
            for h in heads:
                cells.append(Cell(site, layer, h, watch=h * group))
                where.append((c, layer, h))
    store = open_store(runs, checkpoint, "path_patching", "receivers", sender)
    bar = tqdm(total=len(cells) + ("logits" in receivers), desc=f"path patching {sender}",
               disable=not progress or not world().lead, leave=False)
    with bar:
        vals, rows = runs.run(cells, sources, bar, store) if cells else (None, None)
        logits = torch.full((n,), float("nan"))
        if "logits" in receivers:
            sources[(Site.RESID_FINAL, L)] = delta
            logits = runs.run([Cell(Site.RESID_FINAL, L, 0)], sources, bar, store)[0][0]
    if vals is not None:  # every receiver cell watches a head: its rows came back
        _fill_receivers(runs, n, cells, where, vals, cast(Tensor, rows), values, change)
    extra = {} if wanted is None else {"receiver_heads": sorted(wanted)}
    meta = runs.meta("path_patching", sender=tuple(sender), receivers=tuple(receivers),
                     seed=seed, **extra, **_run_meta(runs, checkpoint))
    return PathPatching(tuple(sender), comps, values, logits, change, runs.base, runs.source,
                        meta)


def _head_list(a: Adapter, heads, arg: str) -> set[tuple[int, int]]:
    """``heads`` checked: a non-empty list of head ids (or one ``(layer, head)``)."""
    if isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(x, int) for x in heads):
        heads = [heads]  # one head given as (layer, head)
    try:
        out = {(int(h[0]), int(h[1])) for h in (a.check_head(h, arg) for h in heads)}
    except TypeError:
        raise ValueError(f"{arg}: expected a list of (layer, head) pairs, got {heads!r}"
                         ) from None
    if not out:
        raise ValueError(f"{arg}: empty; pass None for every head")
    return out


def _receiver_heads(a: Adapter, heads, sender: HeadId) -> set[tuple[int, int]] | None:
    """``receiver_heads`` checked: a non-empty list of head ids after the sender's layer."""
    if heads is None:
        return None
    out = _head_list(a, heads, "receiver_heads")
    early = sorted(h for h in out if h[0] <= sender.layer)
    if early:
        raise ValueError(f"receiver_heads: {early} are not after the sender's layer "
                         f"{sender.layer}; a receiver reads the sender's output, so it must "
                         "sit in a later layer")
    return out


def _fill_receivers(runs: PatchRuns, n: int, cells: list[Cell], where: list[tuple[int, int, int]],
                    vals: Tensor, rows: Tensor, values: Tensor, change: Tensor) -> None:
    """Each receiver cell's metric values into ``values`` [component, layer, head, batch], and
    the change of its watched attention row at the read position (patched minus base) into
    ``change`` [component, layer, head, batch, key_pos]."""
    pos = cast(Tensor, runs.readout.positions)  # path patching's metric reads one position
    for k, (c, layer, h) in enumerate(where):
        base_row = runs.base_acts[(Site.PATTERN, layer)][torch.arange(n), cells[k].watch,
                                                          pos.to(_dev(runs, layer))]
        values[c, layer, h] = vals[k]
        change[c, layer, h] = rows[k] - base_row.float().cpu()


def _dev(runs: PatchRuns, layer: int):
    return runs.base_acts[(Site.PATTERN, layer)].device


def _patched_input(a: Adapter, runs: PatchRuns, layer: int, site: Site, delta):
    """The ``site`` projection (q, k or v; before rotary) of every head of ``layer`` computed
    from the base residual plus ``delta``, the receiver's norm recomputed: [batch, pos, head,
    d_head]. Checked first: without ``delta`` it must reproduce the base run's activation."""
    w = a.bare_layer(layer)
    W, b = {Site.Q: (w.W_Q, w.b_Q), Site.K: (w.W_K, w.b_K), Site.V: (w.W_V, w.b_V)}[site]
    resid = runs.base_acts[(Site.RESID_PRE, layer)]  # [batch, pos, d_model]

    def project(x):
        return torch.einsum("bpd,hde->bphe", w.ln1(x), W) + b

    with torch.no_grad():
        want = runs.base_acts[(site, layer)]
        got = project(resid)
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise ModelError(
                f"model {a.name!r}: block {layer}'s {site.value} is not W·norm(resid) + b "
                f"(max |diff| {(got - want).abs().max().item():.2e}); path patching needs it")
        return project(resid + delta.to(resid.dtype))


# fast, batch_size, progress, checkpoint, memory_budget of both patchings
_DEFAULTS = dict(fast=True, batch_size=256, progress=False, checkpoint=None, memory_budget=None)


def _opts(run: RunConfig | None, **given) -> tuple:
    """A keyword given wins, then ``run`` (a RunConfig), then the defaults above."""
    o = run_options(run, given, _DEFAULTS)
    return o["fast"], o["batch_size"], o["progress"], o["checkpoint"], o["memory_budget"]
