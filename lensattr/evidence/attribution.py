"""Attribution patching (AtP) and AtP* for every head, head position and attention edge.

AtP (Nanda 2022; Syed et al. 2023) estimates the effect of patching an activation ``a`` by the
first-order term of its Taylor expansion, for every activation at once, from two forwards and
one backward per batch of prompts:

* ``mode="noising"`` (default): patch the corrupted activation into the clean run,
  ``(a_corr - a_clean) . dm/da`` with the gradient at the clean run; estimates the exact
  ``m(clean run, a := a_corr) - m(clean)``, i.e. resample ablation (``ablate(h, "resample")``).
* ``mode="denoising"``: patch the clean activation into the corrupted run,
  ``(a_clean - a_corr) . dm/da`` at the corrupted run.
* ``mode="tl"``: denoising, TransformerLens's ``attribution_patch`` convention; its
  head-output node scores are :meth:`AtPResult.tl_node_scores` (equal to TL's to 1e-5).

Scored: every head's output ``z`` (per position, and summed), every query ``q``, key and value
``k``/``v`` (per key/value head under GQA) at every position, and every pattern entry
``pattern[layer, head, q, s]`` at the read rows (the "edges"); per prompt (prompts are
independent rows, so the gradient of the summed metric gives each prompt's own).

AtP* (Kramár et al. 2024), as implemented here:

* ``qk_fix=True`` (``q_star``/``k_star``): a query or key change is pushed through the softmax
  exactly. For the key of head ``h`` at source ``s`` the scores ``q_i . k'_s * scale`` of every
  query ``i`` are recomputed with the patched key, the new rows ``alpha'_i`` are the exact
  softmax (a closed form: one column of each row changes), and the estimate is
  ``sum_i (alpha'_i - alpha_i) . dm/dalpha_i``: exact up to the pattern, linear from the
  pattern onwards. A query is the same with one row's scores ``q'_i . k_j * scale``. A
  key/value head shared by several query heads (GQA) sums over its query heads. The gradient is
  the base run's (``ig_steps`` does not change it).
* ``graddrop=True``: for each block ``l`` the gradient is recomputed with block ``l``'s
  contribution to the residual stream (attention plus MLP output) passing no gradient back
  (its value unchanged), giving ``AtP_l(n)``; GradDrop(n) =
  ``sum_l |AtP_l(n)| / (n_layers - 1)`` (``AtP_l`` = 0 for a head in block ``l``, = AtP for a
  head above it, so a head's own block is the one term left out of the average). Unsigned, a
  magnitude for ranking. Scored for head outputs (summed over positions); ``graddrop`` holds it
  per prompt, ``graddrop_of_mean`` on the prompt means (the paper's definition: the absolute
  value is taken of the expectation over prompts). Costs ``n_layers`` extra backward passes.

``ig_steps=k > 1``: integrated gradients, EAP-IG style (Hanna et al. 2024): the residual
entering block 0 (embeddings) is interpolated from the base run towards the other,
``x_alpha = x_base + alpha (x_other - x_base)``, ``alpha = 0, 1/k, ..., (k-1)/k`` (left
Riemann sum, so ``k = 1`` is plain AtP) and the gradients at every activation are averaged.

Two paths: the differentiable hook-free forward (:mod:`.grad_forward`, causal decoders whose
clean readout it reproduces to 1e-4) scores everything; otherwise the bridge with additive
taps on hook_z and hook_pattern scores heads and edges only (``q``/``k``/``v`` are None; edges
are NaN where pattern edits do not reach the output) and refuses ``graddrop``/``ig_steps``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..core.config import RunConfig, run_options
from ..core.metric import Metric, MetricError, check_metric_output
from ..core.metrics import as_metric
from ..core.prompts import PromptSet
from ..core.sites import Site
from ..core.version import __version__
from ..models.adapter import Adapter, Hooks
from .attribution_result import AtPResult
from .grad_forward import GradForward, LayerActs, checked_grad_forward
from .metric_rows import check_finite_metric

__all__ = ["atp", "MODES"]

MODES = ("noising", "denoising", "tl")
_CPU = torch.device("cpu")


def atp(
    model,
    prompts: PromptSet,
    metric,
    *,
    mode: str = "noising",
    qk_fix: bool = True,
    graddrop: bool = False,
    ig_steps: int = 1,
    batch_size: int | None = None,
    fast: bool | None = None,
    run: RunConfig | None = None,
) -> AtPResult:
    """Attribution-patching scores of every head, head position, q/k/v and read-row attention
    edge (see the module docstring for the definitions). ``prompts`` must have corrupted
    prompts; ``metric`` must be differentiable in the logits it reads. ``batch_size``: prompts
    per forward/backward (default 32). ``fast=False`` forces the bridge path. ``run``: a
    RunConfig for both (a keyword wins)."""
    o = run_options(run, dict(batch_size=batch_size, fast=fast), dict(batch_size=32, fast=True))
    batch_size, fast = o["batch_size"], o["fast"]
    t0 = time.perf_counter()
    a = model if isinstance(model, Adapter) else Adapter(model)
    a.one_device("attribution patching")
    metric = as_metric(metric)
    _validate(a, prompts, mode, ig_steps, batch_size, graddrop)
    readout = metric.readout(prompts)
    read_rows = metric.read_positions(prompts).to(_CPU)  # [batch, pos]
    gf, reason = checked_grad_forward(a, prompts, readout) if fast else (None, "fast=False")
    if gf is None and (graddrop or ig_steps > 1):
        opt = "graddrop=True" if graddrop else f"ig_steps={ig_steps}"
        raise ValueError(f"{opt}: needs the hook-free differentiable forward, unavailable for "
                         f"model {a.name!r} ({reason})")
    parts = []
    for i in range(0, len(prompts), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(prompts)))
        p = prompts.take(idx)
        args = (a, p, metric, readout.take(idx), read_rows[idx], mode)
        parts.append(_bare_chunk(gf, *args, qk_fix, graddrop, ig_steps) if gf is not None
                     else _bridge_chunk(*args))
    out: dict[str, Any] = {k: (torch.cat([d[k] for d in parts]) if parts[0][k] is not None
                               else None) for k in parts[0]}  # AtPResult's fields
    gd_mean = None
    if graddrop:
        per = out.pop("graddrop_l")  # [batch, l, layer, head] signed AtP_l
        out["graddrop"] = per.abs().sum(1) / (a.n_layers - 1)
        gd_mean = per.mean(0).abs().sum(0) / (a.n_layers - 1)
    else:
        out.pop("graddrop_l")
    meta = {
        "method": "attribution patching",
        "mode": mode,
        "qk_fix": bool(qk_fix and gf is not None),
        "graddrop": graddrop,
        "ig_steps": ig_steps,
        "path": "hook-free" if gf is not None else "bridge",
        "path_reason": reason,
        # the hook-free forward's block norms: HF's fused modules, or the bridge's arithmetic
        "norms": None if gf is None else ("hf" if gf.native_norms else "bridge"),
        "model": a.name,
        "config": a.config_hash(),
        "weights": a.current_weights_hash(),
        "prompts": prompts.hash(),
        "n_prompts": len(prompts),
        "metric": metric.describe(),
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - t0, 3),
        "lensattr_version": __version__,
    }
    return AtPResult(**out, graddrop_of_mean=gd_mean, meta=meta)


def _validate(a: Adapter, prompts, mode, ig_steps, batch_size, graddrop) -> None:
    if not isinstance(prompts, PromptSet):
        raise ValueError(f"prompts: expected a lensattr PromptSet, got {type(prompts).__name__}")
    if prompts.corrupted is None:
        raise ValueError("prompts: attribution patching needs corrupted prompts "
                         "(PromptSet(corrupted=...)), got none")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    for name, v in (("ig_steps", ig_steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if graddrop and a.n_layers < 2:
        raise ValueError("graddrop: needs a model with at least 2 layers")
    prompts.validate_vocab(a.d_vocab)
    prompts.validate_length(getattr(a.cfg, "n_ctx", None))
    prompts.validate_tokenizer(getattr(a.model, "tokenizer", None), a.name)


def _metric(metric: Metric, values: Tensor, prompts: PromptSet, clean: Tensor) -> Tensor:
    out = check_metric_output(metric.compute(values, prompts, clean), values.shape[0],
                              metric.name)
    check_finite_metric(out.detach(), metric.name)
    return out


def _differentiable(metric: Metric, m: Tensor) -> None:
    if not m.requires_grad:
        raise MetricError(
            f"metric {metric.name!r}: its value carries no gradient (a tensor made without "
            "autograd, .detach(), or a piecewise-constant function such as argmax or a "
            "comparison); attribution patching needs a metric differentiable in the logits")


def _zero_gradient(metric: Metric, grads) -> None:
    if all(g is None or not bool(g.any()) for g in grads):
        raise MetricError(
            f"metric {metric.name!r}: its gradient is zero at every activation (piecewise "
            "constant, e.g. rounding, or at its minimum on this run, as KL to the clean run "
            "is on the clean run: use mode='denoising'); attribution patching needs a "
            "metric whose gradient carries the effect")


def _views(p: PromptSet, mode: str):
    """(base prompts, other prompts): the gradient is taken on the base run."""
    return (p, p.corrupted_view()) if mode == "noising" else (p.corrupted_view(), p)


# ---- the hook-free path --------------------------------------------------------------------
def _bare_chunk(gf: GradForward, a, p, metric, readout, read_rows, mode, qk_fix, graddrop,
                ig_steps) -> dict:
    base_p, other_p = _views(p, mode)
    base, other = gf.embed_pair(base_p, other_p)
    if ig_steps > 1 and not torch.equal(base.key_ok, other.key_ok):
        raise ValueError(f"ig_steps={ig_steps}: interpolating embeddings needs the clean and "
                         "corrupted prompts to share one attention mask")
    # positions before the first one at which the runs differ are the same in both: computed
    # once, and both runs start there (their scores are 0: nothing differs)
    prefix = gf.prefix(base, gf.shared_prefix(base, other, readout.positions))
    with torch.no_grad():
        o_vals, o_acts = gf.run(other, readout, prefix=prefix)

    def grad_run(resid0=None, drop_layer=None, sites=("q", "k", "v", "pattern", "z")):
        vals, acts = gf.run(base, readout, resid0=resid0, drop_layer=drop_layer, prefix=prefix)
        cv = vals.detach() if mode == "noising" else o_vals
        m = _metric(metric, vals, base_p, cv)
        _differentiable(metric, m)
        wrt = [getattr(la, s) for la in acts for s in sites]
        g = torch.autograd.grad(m.sum(), wrt, allow_unused=True)
        g = [torch.zeros_like(t) if x is None else x for t, x in zip(wrt, g, strict=True)]
        return m.detach(), acts, g, vals.detach()

    sites = ("q", "k", "v", "pattern", "z")
    grads: list[Tensor] = []  # set at step 0 (ig_steps >= 1)
    for i in range(ig_steps):
        resid0 = None if i == 0 else base.resid0 + (i / ig_steps) * (other.resid0 - base.resid0)
        with torch.enable_grad():
            m, acts, g, vals = grad_run(resid0)
        if i == 0:
            m_base, b_acts, g0, b_vals = m, [la.detached() for la in acts], g, vals
            _zero_gradient(metric, g)
            grads = list(g)
        else:
            grads = [x + y for x, y in zip(grads, g, strict=True)]
    grads = [x / ig_steps for x in grads]
    clean_vals = b_vals if mode == "noising" else o_vals
    m_other = _metric(metric, o_vals, other_p, clean_vals).detach()
    L, ns = a.n_layers, len(sites)
    g_acts = [_layer_acts(grads[ns * la: ns * la + ns]) for la in range(L)]
    g0_acts = [_layer_acts(g0[ns * la: ns * la + ns]) for la in range(L)]
    p0 = 0 if prefix is None else prefix.p0
    out = _scores(b_acts, o_acts, g_acts, read_rows, p0)
    out["q_star"] = out["k_star"] = None
    if qk_fix:
        allowed = gf.allowed(base.window(p0))
        star = [_qk_star(b, o, g, allowed, gf.layers[la].scale, gf.kv_map, a.n_kv_heads)
                for la, (b, o, g) in enumerate(zip(b_acts, o_acts, g0_acts, strict=True))]
        out["q_star"] = _pad(torch.stack([s[0] for s in star], 1), 2, p0).cpu()
        out["k_star"] = torch.stack([s[1] for s in star], 1).cpu()
    out["graddrop_l"] = None
    if graddrop:
        per = []
        for layer in range(L):
            with torch.enable_grad():
                _, _, g, _ = grad_run(drop_layer=layer, sites=("z",))
            dz = [(o.z - b.z) * gz for o, b, gz in zip(o_acts, b_acts, g, strict=True)]
            per.append(torch.stack([d.sum((1, 3)) for d in dz], 1))  # [batch, layer, head]
        out["graddrop_l"] = torch.stack(per, 1).float().cpu()  # [batch, dropped, layer, head]
    out["base"], out["other"] = m_base.float().cpu(), m_other.float().cpu()
    return out


def _pad(t: Tensor, dim: int, n: int) -> Tensor:
    """``t`` with ``n`` zeros in front along ``dim`` (the shared prefix's positions)."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat((t.new_zeros(shape), t), dim)


def _scores(b_acts, o_acts, g_acts, read_rows, p0: int = 0) -> dict:
    """First-order scores (other - base) . grad at every site, per prompt; activations of
    positions ``p0``.. (a shared prefix before: scores 0)."""
    def dot(s):
        return _pad(torch.stack([((getattr(o, s) - getattr(b, s)) * getattr(g, s)).sum(-1)
                                 for b, o, g in zip(b_acts, o_acts, g_acts, strict=True)], 1),
                    2, p0).cpu()

    by_pos = dot("z")  # [batch, layer, pos, head]
    edges = _pad(torch.stack([(o.pattern - b.pattern) * g.pattern
                              for b, o, g in zip(b_acts, o_acts, g_acts, strict=True)], 1),
                 3, p0).cpu()
    rows = read_rows[:, None, None, :, None]  # [batch, 1, 1, query_pos, 1]
    edges = torch.where(rows, edges.float(), torch.nan)
    return {"heads": by_pos.sum(2).float(), "heads_by_pos": by_pos.float(), "edges": edges,
            "q": dot("q").float(), "k": dot("k").float(), "v": dot("v").float()}


def _qk_star(b: LayerActs, o: LayerActs, g: LayerActs, allowed: Tensor, scale: float,
             kv_map: Tensor, n_kv: int) -> tuple[Tensor, Tensor]:
    """AtP* query and key scores of one layer: ([batch, query_pos, head], [batch, pos,
    kv_head]; query positions from ``b.p0``, ``allowed`` their rows). The pattern change
    of a patched query row / key column is computed exactly (softmax), then dotted with the
    pattern's gradient."""
    f64 = torch.float64
    P, G = b.pattern.to(f64), g.pattern.to(f64)  # [batch, head, q, key]
    ok = allowed[:, None].expand_as(P)  # [batch, head, q, key]
    q, dq = b.q.to(f64), (o.q - b.q).to(f64)  # [batch, query_pos, head, d]
    # keys of every position (a shared prefix's included: unchanged there)
    k, dk = b.k_all()[:, :, kv_map].to(f64), _pad(o.k - b.k, 1, b.p0)[:, :, kv_map].to(f64)
    logp = torch.where(ok, P.log(), -torch.inf)
    # queries: row i of head h gets scores + (q'_i - q_i) . k_j * scale, exact softmax
    dq_scores = torch.einsum("bihd,bjhd->bhij", dq, k) * scale
    new = torch.softmax(torch.where(ok, logp + dq_scores, -torch.inf), dim=-1)
    has = ok.any(-1, keepdim=True)
    new = torch.where(has, new, P)
    q_star = ((new - P) * G).sum(-1).transpose(1, 2)  # [batch, q, head]
    # keys: column s of every row i gets + q_i . (k'_s - k_s) * scale; closed-form softmax
    delta = torch.einsum("bihd,bshd->bhis", q, dk) * scale
    lse = torch.logaddexp(torch.log1p(-P.clamp(max=1.0)), logp + delta)
    f = torch.exp(-lse)  # new / old mass of the unchanged entries
    p_new = torch.exp(logp + delta - lse)  # the changed entry
    row = (P * G).sum(-1, keepdim=True)  # [batch, head, q, 1]
    change = row * (f - 1) + G * (p_new - P * f)
    change = torch.where(ok, change, 0.0).sum(2)  # [batch, head, key]
    k_star = torch.zeros(change.shape[0], n_kv, change.shape[2], dtype=f64, device=P.device)
    k_star.index_add_(1, kv_map, change)
    return q_star.float(), k_star.transpose(1, 2).float()


def _layer_acts(ts: list[Tensor]) -> LayerActs:
    """One layer's five tensors in the order of ``sites`` (q, k, v, pattern, z)."""
    q, k, v, pattern, z = ts
    return LayerActs(q, k, v, pattern, z)


# ---- the bridge path -------------------------------------------------------------------------
def _bridge_chunk(a: Adapter, p, metric, readout, read_rows, mode) -> dict:
    base_p, other_p = _views(p, mode)
    store: dict = {}
    o_vals = a.read(other_p.tokens, other_p.attention_mask, readout,
                    a.capture_hooks((Site.Z, Site.PATTERN), store))
    editable = a.pattern_editable
    taps: dict = {}

    def tap(key):
        def f(x):
            d = torch.zeros_like(x, requires_grad=True)
            taps[key] = (x.detach(), d)
            return x + d
        return f

    hooks: Hooks = {(s, la): tap((s, la)) for la in range(a.n_layers)
                    for s in ((Site.Z, Site.PATTERN) if editable else (Site.Z,))}
    vals = a.read_grad(base_p.tokens, base_p.attention_mask, readout, hooks)
    cv = vals.detach() if mode == "noising" else o_vals
    m = _metric(metric, vals, base_p, cv)
    _differentiable(metric, m)
    keys = list(taps)
    grads = torch.autograd.grad(m.sum(), [taps[k][1] for k in keys], allow_unused=True)
    g = dict(zip(keys, grads, strict=True))
    _zero_gradient(metric, grads)
    m_other = _metric(metric, o_vals, other_p, vals.detach() if mode == "noising" else o_vals)
    pos_terms: list[Tensor] = []
    edge_terms: list[Tensor] = []
    for la in range(a.n_layers):
        key = (Site.Z, la)
        gz = g[key] if g[key] is not None else torch.zeros_like(taps[key][0])
        pos_terms.append(((store[key] - taps[key][0]) * gz).sum(-1))  # [batch, pos, head]
        key = (Site.PATTERN, la)
        if editable and g.get(key) is not None:
            edge_terms.append((store[key] - taps[key][0]) * g[key])
        else:
            edge_terms.append(torch.full_like(store[key], torch.nan))
    by_pos = torch.stack(pos_terms, 1).float().cpu()
    edges = torch.stack(edge_terms, 1).float().cpu()
    edges = torch.where(read_rows[:, None, None, :, None], edges, torch.nan)
    return {"heads": by_pos.sum(2), "heads_by_pos": by_pos, "edges": edges, "q": None,
            "k": None, "v": None, "q_star": None, "k_star": None, "graddrop_l": None,
            "base": m.detach().float().cpu(), "other": m_other.detach().float().cpu()}
