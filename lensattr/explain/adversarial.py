"""Adversarial attention (Jain & Wallace 2019): for one head, search by gradient on its
attention logits for attention as different as possible from its own (Jensen-Shannon
divergence) while the metric moves by less than ε.

The variable is ``delta`` [batch, query_pos, key_pos], added to the head's own logits
``log alpha`` at the edited rows; the attention tried is ``softmax(log alpha + delta)`` over the
allowed sources only (masked sources get exactly 0, so the causal mask and the padding are
respected by construction). Each step runs the model with the head's rows replaced (a hook on
hook_pattern, or hook_z = pattern @ v where the pattern is not editable) and takes a
normalised gradient step along the JSD gradient; once |metric change| passes
``margin * eps`` the component of that step that would grow the change is projected out and
a pull back along the metric's gradient
is added (gradient projection). A step that breaks the bound is pulled halfway back to the
prompt's last feasible point and its step size halved; a feasible one grows it by 1.2.
Every step's attention is a candidate; per prompt we keep the largest JSD among candidates
whose metric change was strictly below ε
(the unedited attention, JSD 0, is always one), and re-run the winners to confirm the bound.
JSD is in nats (at most ln 2), averaged over the edited rows that have more than one source.

Softmax gradients vanish on sources the head gives ~0 weight, so a search started from the
head's own attention can only move mass to sources it already uses. ``restarts`` R runs start
from ``(1 - w) * own + w * uniform`` (w = 0, 1/(R-1), ..., 1), plus noise of ``init_scale`` on
the logits; each prompt keeps its best over the runs.
"""

from __future__ import annotations

import math
import time

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .edits import Unit, evaluate, override_hooks, units_from
from .setup import Setup, TestTable, prepare, run_edits, unit_columns

__all__ = ["jsd", "adversarial_attention", "adversarial_from"]

_NEG = -1e9  # logit of a masked source: exp underflows to exactly 0 in float32


def jsd(p: Float[Tensor, "... key_pos"], q: Float[Tensor, "... key_pos"]) -> Float[Tensor, "..."]:
    """Jensen-Shannon divergence in nats along the last axis (0 log 0 = 0)."""
    m = 0.5 * (p + q)
    kl_pm = torch.xlogy(p, p) - torch.xlogy(p, m)
    kl_qm = torch.xlogy(q, q) - torch.xlogy(q, m)
    return 0.5 * (kl_pm.sum(-1) + kl_qm.sum(-1))


def _search(s: Setup, unit: Unit, steps: int, lr: float, penalty: float, margin: float,
            init_scale: float, g: torch.Generator, start: float
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised gradient ascent on each prompt's delta with a per-prompt step size: a step
    that breaks the bound is halved back towards the last feasible point and the step size
    halved; a feasible one is kept and the step size grows by 1.2."""
    P = s.clean.unit_pattern(unit)[:, 0].double()  # [batch, q, k]
    A = s.allowed
    rows = s.rows & (A.sum(-1) > 1)  # rows with a choice to make
    nrows = rows.sum(-1).clamp(min=1).double()  # [batch]
    logits0 = torch.where(A, P.clamp(min=1e-30).log(), _NEG)
    b = len(s.prompts)
    U = A.double() / A.sum(-1, keepdim=True).clamp(min=1)
    mix = torch.where(A, ((1 - start) * P + start * U).clamp(min=1e-30).log() - logits0, 0.0)
    delta = mix + init_scale * torch.randn(P.shape, generator=g, dtype=P.dtype)
    last_ok = torch.zeros_like(delta)  # the unedited attention is always feasible
    step = torch.full((b, 1, 1), float(lr), dtype=P.dtype)
    m0 = s.clean.metric.double()
    best_jsd = torch.zeros(b, dtype=torch.float64)
    best = P.clone()
    feasible_steps = torch.zeros(b, dtype=torch.long)
    for _ in range(steps):
        delta.requires_grad_()
        new = torch.softmax(torch.where(A, logits0 + delta, _NEG), -1)
        new = torch.where(A, new, 0.0)
        ev = evaluate(s.adapter, s.prompts, s.metric,
                      override_hooks(s.adapter, unit, s.rows, new[:, None].float()),
                      clean_values=s.clean.values, grad=True)
        dm = ev.metric.double().cpu() - m0
        div = (jsd(new, P) * rows).sum(-1) / nrows  # [batch]
        (g_div,) = torch.autograd.grad(div.sum(), delta, retain_graph=True)
        (g_dm,) = torch.autograd.grad(dm.sum(), delta)  # prompts are independent: sums are
        # per-prompt gradients
        with torch.no_grad():
            feas = (dm.abs() < s.eps) & torch.isfinite(dm)
            better = feas & (div > best_jsd)
            best_jsd = torch.where(better, div, best_jsd)
            best = torch.where(better[:, None, None], new, best)
            feasible_steps += feas.long()
            f3 = feas[:, None, None]
            delta = delta.detach()
            last_ok = torch.where(f3, delta, last_ok)
            step = torch.where(f3, step * 1.2, step * 0.5)
            delta = torch.where(f3, delta + step * _direction(g_div, g_dm, dm / s.eps, margin,
                                                              penalty),
                                0.5 * (delta + last_ok))
    return best.float(), best_jsd.float(), feasible_steps


def _direction(g_div: Tensor, g_dm: Tensor, r: Tensor, margin: float, penalty: float
               ) -> Tensor:
    """Unit ascent direction per prompt: the JSD gradient, with its component that would
    grow |metric change| removed once |change| / eps = |r| passes ``margin``, plus a pull
    back of strength ``penalty * (|r| - margin)`` along the metric's gradient."""
    c = g_dm * torch.sign(r)[:, None, None]  # gradient of |metric change|
    cc = (c * c).flatten(1).sum(1).clamp(min=1e-30)[:, None, None]
    dc = (g_div * c).flatten(1).sum(1)[:, None, None]
    near = (r.abs() > margin)[:, None, None]
    d = torch.where(near & (dc > 0), g_div - dc / cc * c, g_div)
    d = d / d.flatten(1).norm(dim=1).clamp(min=1e-30)[:, None, None]
    pull = (penalty * (r.abs() - margin)).clamp(min=0)[:, None, None]
    return d - pull * c / cc.sqrt()


def adversarial_from(s: Setup, units: list[Unit], steps: int = 100, lr: float = 1.0,
                     penalty: float = 1.0, margin: float = 0.5, init_scale: float = 0.1,
                     restarts: int = 2, seed: int = 0) -> TestTable:
    for name, v in (("steps", steps), ("restarts", restarts)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
    for name, x in (("lr", lr), ("penalty", penalty), ("init_scale", init_scale)):
        if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0):
            raise ValueError(f"{name}: expected a finite number > 0, got {x!r}")
    if not 0 < margin <= 1:
        raise ValueError(f"margin: expected a fraction of eps in (0, 1], got {margin!r}")
    bad = [u.label for u in units if u.kind != "head"]
    if bad:
        raise ValueError(f"layers: the adversarial search runs per head, not per layer ({bad})")
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    frames, summary, tensors = [], [], {}
    for unit in units:
        # start i from (1 - w) * own + w * uniform, w = i / (R - 1)
        best, div, nfeas = _search(s, unit, steps, lr, penalty, margin, init_scale, g, 0.0)
        for i in range(1, restarts):
            found = _search(s, unit, steps, lr, penalty, margin, init_scale, g,
                            i / max(restarts - 1, 1))
            take = found[1] > div
            best = torch.where(take[:, None, None], found[0], best)
            div, nfeas = torch.where(take, found[1], div), nfeas + found[2]
        check = run_edits(s, unit, best[None, :, None])  # the winners, re-run without grad
        b = len(s.prompts)
        frames.append(pd.DataFrame({
            **{k: [v] * b for k, v in unit_columns(unit).items()}, "prompt": range(b),
            "jsd": div.numpy(), "delta": check.delta[0].numpy(), "tvd": check.tvd[0].numpy(),
            "feasible_steps": nfeas.numpy()}))
        summary.append({**unit_columns(unit), "jsd_mean": float(div.mean()),
                        "jsd_median": float(div.median()), "jsd_max": float(div.max()),
                        "abs_delta_max": float(check.delta.abs().max()),
                        "within_eps": bool((check.delta.abs() < s.eps).all()),
                        "tvd_max": float(check.tvd.max()) if check.tvd.isfinite().all()
                        else float("nan")})
        tensors[f"adversarial.{unit.label}"] = best
    meta = {**s.meta(), "test": "adversarial", "steps": steps, "restarts": restarts, "lr": lr,
            "penalty": penalty,
            "margin": margin, "init_scale": init_scale, "seed": seed, "jsd_units": "nats",
            "seconds": time.perf_counter() - t0,
            "tensor_axes": {"adversarial.<head>": "batch query_pos key_pos: the attention found "
                            "(rows outside the edited rows are the head's own)"},
            "frame": "one row per (head, prompt): largest JSD found with |delta| < eps; delta "
                     "and tvd re-measured on the attention found"}
    return TestTable("adversarial", pd.concat(frames, ignore_index=True),
                     pd.DataFrame(summary), tensors, meta)


def adversarial_attention(model, task, heads, eps: float, metric=None, n_prompts=None,
                          seed: int = 0, rows: str = "read", steps: int = 100, lr: float = 1.0,
                          penalty: float = 1.0, margin: float = 0.5, init_scale: float = 0.1,
                          restarts: int = 2) -> TestTable:
    """Largest-JSD attention per head (``heads``: HeadIds) with the metric moved by < ``eps``
    (in the metric's units)."""
    s = prepare(model, task, metric, n_prompts, seed, rows, eps)
    return adversarial_from(s, units_from(s.adapter, heads, None), steps, lr, penalty, margin,
                            init_scale, restarts, seed)
