"""False labels after selection: marginal 95% vs false-coverage-rate (FCR) intervals, by
simulation, without a model.

The verdict pipeline reads intervals on heads a test across heads selected: the routing ratio
rho, the sink share and the necessity on heads that are ``relevant`` (BH over m heads), and e's
interval on heads the equivalence test (TOST, BH) selected as ``null``. This script generates
per-prompt metric values for m heads, runs the pipeline, and counts the labels that are false
under the truth that generated the data.

Data (one ablation baseline, "resample"; per prompt i, shared clean m0_i ~ N(2, 0.5^2) and
corrupted-run denominator D_i = m_c - m0 ~ -(1 + 0.3 z)): for a head with true effect e, routing
rho, necessity nu and sink share sigma,

    m(ablated) - m0       = d_i = e * D_i + s_e * u_i          s_e = 0.03 + 0.25 |e|
    m(keep C) - m(abl)    = -rho * d_i + gamma * s_e * u_i + s_k * eta1_i
    m(C removed) - m0     = nu * d_i + s_k * eta2_i
    m(sink removed) - m0  = sigma * d_i + s_k * eta3_i          s_k = 0.02

(u, eta standard normal, independent across heads), so e = E(d) / E(D), rho = E(keep - abl) /
E(m0 - abl), nu and sigma likewise: a linear head. ``gamma`` couples the keep-only residual to
the head's own per-prompt effect heterogeneity u (prompts where the head matters more than e
predicts route differently): gamma = 0 makes rho's pivot independent of the selection
statistic (then marginal intervals are conditionally exact after selection on e); gamma = 0.8
makes them correlated (selection biases the marginal interval).

Head mix (fractions of m; the counts are rounded): 55% null (e = 0; keep-only ~ m0, i.e. a
measured rho ~ 1: the dangerous case, a false discovery would read as ``faithful``), 10% tiny
(e = 0.01, 0.02, 0.03: inside the null margin), 6% near the margin (e = 0.04, 0.05, rho at the
band edges 0.65, 0.7, 1.3, 1.35, 0.3, 0.35), 26% relevant (e in 0.08, 0.15, 0.3, 0.5 crossed
with rho in 1.0, 0.9, 0.8, 0.7, 1.3, 1.2, 0.65, 1.35, 0.5, 0.35, 0.3, 0.25, 0.1, 0.0), 3% sink
heads (e = 0.3, rho = nu = 0.1, sigma = 0.8). nu = rho and sigma = 0 for all but the sink
heads. Configurations: m = 144 and 270, n = 16 and 32, gamma = 0 and 0.8.

Stress mix (a worst case, not a typical model): half the heads null, half just above the null
margin (e = 0.04, 0.045, 0.05) with true rho just outside the bands (1.35, 1.4, 0.65, 0.6,
0.35, 0.4: every ``faithful`` or ``misleading`` label is false), gamma = 0.9 and s_k = 0.005, so
the keep-only residual is mostly the head's own heterogeneity, and selecting heads whose e came
out large drags their rho estimates down (from 1.35 into [0.7, 1.3], from 0.35 below 0.3);
m = 270, n = 32 and 64.

A label is false when (truth): ``faithful``: |e| <= delta, rho outside [0.7, 1.3], nu <= 0.5 or
sigma > 0.5; ``misleading``: |e| <= delta or rho >= 0.3; ``partial``: |e| <= delta or rho in
[0.7, 1.3] or rho < 0.3; ``through_sink``: |e| <= delta or sigma <= 0.5; ``inert`` /
``negligible``: |e| >= delta. ``undetermined`` makes no claim. The false label rate is
E[false labels / max(labels, 1)] (mean over runs; the FDR-style rate alpha = 0.05 aims at),
with its Monte Carlo standard error; pooled sum(false) / sum(labels) beside it.

Pipelines, all computed here from :mod:`lensattr.compare.stats`,
:mod:`lensattr.compare.selection` and :func:`lensattr.compare.verdicts.relevance` /
:func:`~lensattr.compare.verdicts.routing_class` (so the comparison does not depend on how
``judge`` is wired):

* ``marginal``: every interval at 95%.
* ``fcr``: BY intervals for the selected heads: rho, sink share and necessity at
  1 - alpha * R / m, R = number of relevant heads, m = number of heads tested; for the null
  check, e's interval at 1 - alpha * R0 / m, R0 = heads with TOST q < alpha.
* ``fcr+e``: as ``fcr``, and relevance itself reads e's interval at 1 - alpha * R_bh / m
  (R_bh = heads with BH q < alpha) instead of the marginal one.
* ``judge``: :func:`lensattr.compare.judge.judge` as it is in the working tree, on the first
  ``--judge-runs`` runs of each configuration (it recomputes everything per head, ~1 s a call).

The relevance test is the package's two-sided sign-flip test for n <= 16 (exact enumeration,
as ``judge`` runs it). For n > 16 ``judge`` draws Monte Carlo sign patterns (~0.6 s a run at
m = 270); here the two-sided one-sample t test (:func:`lensattr.compare.stats.one_sided_p`,
``method="t"``) stands in for it to keep the run short: it selects through the same BH, which is
what this experiment is about; the ``judge`` column, which uses the sign-flip test, shows how
often the two agree.

Also reported: the false-coverage rate of the routing intervals themselves, E[#relevant heads
(true e != 0) whose rho interval misses the true rho / max(#those, 1)], and of e's intervals over
the BH-selected heads.

Run from the repository root: ``python experiments/fcr_simulation.py`` (defaults: 150 runs per
configuration, 8 of them through ``judge``, seed 0; about 5 minutes on 2 shared cores) ->
``experiments/results/fcr_simulation.md``. ``--runs 40 --judge-runs 4`` for a quick look.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from collections import Counter
from pathlib import Path

import torch

from lensattr.compare.judge import Effects, judge
from lensattr.compare.verdicts import Thresholds, relevance, routing_class
from lensattr.core.types import AblationMethod, HeadId
from lensattr.evidence.keys import Kind, key
from lensattr.stats.inference import (
    EXACT_MAX_N,
    Estimate,
    bh_qvalues,
    one_sided_p,
    ratio_of_means,
    signflip_p,
)
from lensattr.stats.ratio import tost_p
from lensattr.stats.selection import fcr_estimates

B = "resample"
TH = Thresholds()
LABELS = ("faithful", "misleading", "partial", "through_sink", "inert", "negligible")
ROUTING_LABELS = ("faithful", "misleading", "partial", "through_sink")
PIPELINES = ("marginal", "fcr", "fcr+e")
S_K = 0.02
# (m, n, gamma, mix, s_k): the realistic mix, then a stress test (see the docstring)
CONFIGS = [(m, n, g, "realistic", S_K) for m in (144, 270) for n in (16, 32) for g in (0.0, 0.8)]
CONFIGS += [(270, 32, 0.9, "stress", 0.005), (270, 64, 0.9, "stress", 0.005)]
ROUTING_TAKES_SHARES = "necessity" in inspect.signature(routing_class).parameters


# ---- the truth --------------------------------------------------------------------------------


def head_mix(m: int, mix: str = "realistic") -> dict[str, torch.Tensor]:
    """True (e, rho, nu, sigma) for m heads, in a fixed, shuffled order (module docstring)."""
    rows: list[tuple[float, float, float, float]] = []
    if mix == "stress":
        edge_rho = (1.35, 0.35, 1.4, 0.65, 0.4, 0.6)
        rows += [((0.04, 0.045, 0.05)[i % 3], edge_rho[i % 6], edge_rho[i % 6], 0.0)
                 for i in range(m // 2)]
    else:
        n_tiny, n_edge, n_rel, n_sink = (round(f * m) for f in (0.10, 0.06, 0.26, 0.03))
        rows += [(0.01 * (1 + i % 3), 1.0, 1.0, 0.0) for i in range(n_tiny)]
        edge_rho = (0.65, 0.7, 1.3, 1.35, 0.3, 0.35)
        rows += [((0.04, 0.05)[i % 2], edge_rho[i % 6], edge_rho[i % 6], 0.0)
                 for i in range(n_edge)]
        rhos = (1.0, 0.9, 0.8, 0.7, 1.3, 1.2, 0.65, 1.35, 0.5, 0.35, 0.3, 0.25, 0.1, 0.0)
        effs = (0.08, 0.15, 0.3, 0.5)
        rows += [(effs[i % 4], rhos[i % 14], rhos[i % 14], 0.0) for i in range(n_rel)]
        rows += [(0.3, 0.1, 0.1, 0.8)] * n_sink
    rows += [(0.0, 1.0, 1.0, 0.0)] * (m - len(rows))  # null heads
    t = torch.tensor(rows, dtype=torch.float64)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(1))  # spread over layers
    t = t[perm]
    return {"e": t[:, 0], "rho": t[:, 1], "nu": t[:, 2], "sigma": t[:, 3]}


def generate(truth, n: int, gamma: float, gen, s_k: float = S_K) -> dict[str, torch.Tensor]:
    """Per-prompt metric values [m, n] for one run (see the module docstring)."""
    e, rho, nu, sig = (truth[k][:, None] for k in ("e", "rho", "nu", "sigma"))
    m = e.shape[0]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    m0 = 2.0 + 0.5 * randn(n)
    den = -(1.0 + 0.3 * randn(n))
    s_e = 0.03 + 0.25 * e.abs()
    u = randn(m, n)
    d = e * den + s_e * u
    abl = m0 + d
    keep = abl - rho * d + gamma * s_e * u + s_k * randn(m, n)
    remove = m0 + nu * d + s_k * randn(m, n)
    sink = m0 + sig * d + s_k * randn(m, n)
    return {"m0": m0, "den": den, "abl": abl, "keep": keep, "remove": remove, "sink": sink}


def false_label(lbl: str, e: float, rho: float, nu: float, sig: float) -> bool:
    small = abs(e) <= TH.delta
    if lbl == "faithful":
        return small or not 0.7 <= rho <= 1.3 or nu <= TH.necessary or sig > TH.sink_carried
    if lbl == "misleading":
        return small or rho >= TH.misleading_hi
    if lbl == "partial":
        return small or TH.faithful_lo <= rho <= TH.faithful_hi or rho < TH.misleading_hi
    if lbl == "through_sink":
        return small or sig <= TH.sink_carried
    if lbl in ("inert", "negligible"):
        return abs(e) >= TH.delta
    return False


# ---- the pipeline, computed here --------------------------------------------------------------


def _inside(x: Estimate) -> bool:
    return math.isfinite(x.lo) and math.isfinite(x.hi) and -TH.delta <= x.lo and x.hi <= TH.delta


def _klass(rho: Estimate, sink: Estimate, nec: Estimate) -> str:
    if ROUTING_TAKES_SHARES:
        return routing_class(rho, TH, sink, nec)
    return routing_class(rho, TH)


ROUTED = {"through_sink": "through_sink", "through_claim": "faithful",
          "elsewhere": "misleading", "partial": "partial"}  # fmt: skip


def _at_fcr(num, den, sel: torch.Tensor, n_tested: int, base: list) -> list:
    """``base`` (marginal estimates) with the selected cells replaced by their FCR-level
    Fieller estimates (R = sel.sum() of n_tested)."""
    idx = sel.nonzero().flatten().tolist()
    if not idx:
        return base
    out = list(base)
    fcr = fcr_estimates(num[idx], den, torch.ones(len(idx), dtype=torch.bool), TH.alpha,
                        n_tested=n_tested)
    for k, i in enumerate(idx):
        out[i] = fcr[k]
    return out


def pipeline_labels(x, e: list, q: torch.Tensor, q_null: torch.Tensor, kind: str
                    ) -> tuple[list, dict]:
    """Labels of every head under pipeline ``kind`` from the marginal effects ``e`` and the BH
    q-values; also the selected sets and intervals for the coverage counts."""
    m = q.numel()
    num = x["abl"] - x["m0"]
    n_tested = int(torch.isfinite(q).sum())
    sel_bh = q < TH.alpha
    e_rel = _at_fcr(num, x["den"], sel_bh, n_tested, e) if kind == "fcr+e" else e
    sel_null = q_null < TH.alpha
    e_null = _at_fcr(num, x["den"], sel_null, n_tested, e) if kind != "marginal" else e
    rel = []
    for i in range(m):
        r = relevance(e_rel[i], float(q[i]), float(q_null[i]), TH)
        if r == "null" and not _inside(e_null[i]):
            r = "unclear"
        rel.append(r)
    idx = [i for i in range(m) if rel[i] == "relevant"]
    labels = ["negligible" if r == "null" else "undetermined" for r in rel]
    shares = {}
    if idx:
        # BY with the selection "relevant": R = len(idx) of the n_tested heads
        sel = torch.full((len(idx),), kind != "marginal")
        abl = x["abl"][idx]
        m0 = x["m0"][None]
        rho = fcr_estimates(x["keep"][idx] - abl, m0 - abl, sel, TH.alpha, n_tested=n_tested)
        nec = fcr_estimates(x["remove"][idx] - m0, abl - m0, sel, TH.alpha, n_tested=n_tested)
        sink = fcr_estimates(x["sink"][idx] - m0, abl - m0, sel, TH.alpha, n_tested=n_tested)
        for k, i in enumerate(idx):
            labels[i] = ROUTED.get(_klass(rho[k], sink[k], nec[k]), "undetermined")
            shares[i] = rho[k]
    return labels, {"rho": shares, "e": (e_rel, sel_bh)}


def judge_labels(x, heads, shape) -> list[str]:
    values = {}
    for i, h in enumerate(heads):
        for kind, name in ((Kind.ABLATE, "abl"), (Kind.KEEP, "keep"), (Kind.REMOVE, "remove"),
                           (Kind.SINK, "sink")):
            values[key(kind, h, baseline=B)] = x[name][i]
    eff = Effects(values, x["m0"], x["den"])
    j = judge(eff, heads, [AblationMethod.RESAMPLE], torch.zeros(shape, dtype=torch.bool),
              False, TH, None)
    return [v.label for v in j.verdicts[B]]


# ---- one configuration ------------------------------------------------------------------------


def run_config(m, n, gamma, mix, s_k, runs, judge_runs, seed):
    L, H = {144: (12, 12), 270: (30, 9)}[m]
    heads = [HeadId(layer, head) for layer in range(L) for head in range(H)]
    truth = head_mix(m, mix)
    tr = [tuple(float(truth[k][i]) for k in ("e", "rho", "nu", "sigma")) for i in range(m)]
    gen = torch.Generator().manual_seed(seed)
    data = [generate(truth, n, gamma, gen, s_k) for _ in range(runs)]
    nums = torch.stack([x["abl"] - x["m0"] for x in data])  # [runs, m, n]
    dens = torch.stack([x["den"] for x in data])[:, None].expand_as(nums)
    if n <= EXACT_MAX_N:  # exact enumeration: batching the runs gives the same p-values
        p_all = signflip_p(nums.reshape(-1, n)).reshape(runs, m)
    else:  # see the docstring: the t test stands in for the Monte Carlo sign-flip test
        flat = nums.reshape(-1, n)
        lo, hi = (one_sided_p(flat, alternative=a, method="t") for a in ("less", "greater"))
        p_all = (2 * torch.minimum(lo, hi)).clamp(max=1).reshape(runs, m)
    q_all = torch.stack([bh_qvalues(t) for t in p_all])
    qn_all = torch.stack([bh_qvalues(t) for t in tost_p(nums, dens, TH.delta).float()])
    out = {k: {"rate": [], "rate_routing": [], "false": 0, "labels": 0, "by": Counter(),
               "by_false": Counter(), "rho_fcr": [], "e_fcr": []}
           for k in (*PIPELINES, "judge")}
    agree = [0, 0]
    errors = []
    for r in range(runs):
        x = data[r]
        per = {}
        e = ratio_of_means(nums[r], x["den"])  # marginal 95%
        for kind in PIPELINES:
            per[kind], sel = pipeline_labels(x, e, q_all[r], qn_all[r], kind)
            o = out[kind]
            cover = [not (est.lo <= tr[i][1] <= est.hi) for i, est in sel["rho"].items()
                     if tr[i][0] != 0]
            o["rho_fcr"].append(sum(cover) / max(len(cover), 1))
            e_est, sel_bh = sel["e"]
            miss = [not (e_est[i].lo <= tr[i][0] <= e_est[i].hi)
                    for i in sel_bh.nonzero().flatten().tolist()]
            o["e_fcr"].append(sum(miss) / max(len(miss), 1))
        if r < judge_runs:
            try:
                per["judge"] = judge_labels(x, heads, (L, H))
                agree[0] += sum(a == b for a, b in zip(per["judge"], per["fcr"], strict=True))
                agree[1] += m
            except Exception as err:  # the judge is being rewritten: report, do not stop
                errors.append(f"{type(err).__name__}: {err}")
        for kind, labels in per.items():
            o = out[kind]
            flags = [(lb, false_label(lb, *tr[i])) for i, lb in enumerate(labels) if lb in LABELS]
            v = sum(f for _, f in flags)
            o["rate"].append(v / max(len(flags), 1))
            routed = [f for lb, f in flags if lb in ROUTING_LABELS]
            o["rate_routing"].append(sum(routed) / max(len(routed), 1))
            o["false"] += v
            o["labels"] += len(flags)
            o["by"].update(lb for lb, _ in flags)
            o["by_false"].update(lb for lb, f in flags if f)
    return out, agree, errors


def _mean_se(xs):
    t = torch.tensor(xs, dtype=torch.float64)
    if t.numel() == 0:
        return math.nan, math.nan
    se = float(t.std() / t.numel() ** 0.5) if t.numel() > 1 else math.nan
    return float(t.mean()), se


def _fmt(xs, se=True):
    mu, s = _mean_se(xs)
    if math.isnan(mu):
        return "n/a"
    return f"{mu:.4f} ± {s:.4f}" if se else f"{mu:.4f}"


def _three(out, key):
    return " / ".join(_fmt(out[k][key]) for k in PIPELINES)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=150)
    ap.add_argument("--judge-runs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="experiments/results/fcr_simulation.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    rows, by_rows, cov_rows, notes = [], [], [], []
    for c, (m, n, gamma, mix, s_k) in enumerate(CONFIGS):
        out, agree, errors = run_config(m, n, gamma, mix, s_k, args.runs, args.judge_runs,
                                        args.seed + c)
        cfg = f"{mix}, m={m}, n={n}, γ={gamma}" + ("" if s_k == S_K else f", s_k={s_k}")
        jr = min(args.judge_runs, args.runs)
        oj = out["judge"]
        judged = ("error" if errors else
                  f"{_fmt(oj['rate'], False)} / {_fmt(oj['rate_routing'], False)} ({jr} runs; "
                  f"{agree[0] / max(agree[1], 1):.3f} of labels = `fcr`'s)")
        rows.append([cfg, " / ".join(f"{out[k]['labels'] / args.runs:.1f}" for k in PIPELINES),
                     _three(out, "rate"), _three(out, "rate_routing"), judged])
        if errors:
            notes.append(f"{cfg}: judge() failed {len(errors)}x: {errors[0]}")
        cov_rows.append([cfg] + [_fmt(out[k]["rho_fcr"]) for k in ("marginal", "fcr")]
                        + [_fmt(out[k]["e_fcr"]) for k in ("marginal", "fcr+e")])
        by_rows.append([cfg] + [
            " / ".join(f"{out[k]['by_false'][lb]}/{out[k]['by'][lb]}" for k in PIPELINES)
            for lb in (*ROUTING_LABELS, "negligible")])
        print(" | ".join(rows[-1]), f"[{time.time() - t0:.0f} s]", flush=True)
    lines = [
        "# False labels after selection: marginal vs FCR intervals",
        "",
        f"`python experiments/fcr_simulation.py --runs {args.runs} --judge-runs "
        f"{args.judge_runs} --seed {args.seed}` ({time.time() - t0:.0f} s; {args.runs} runs "
        "per configuration). Data, head mixes, pipelines and the definition of a false label: "
        "the script's docstring. alpha = 0.05, delta = 0.03, one baseline (resample), no "
        "striking patterns (null-class labels are `negligible`); routing_class "
        f"{'takes' if ROUTING_TAKES_SHARES else 'does not take'} the sink share and necessity.",
        "",
        "False label rate = mean over runs of false labels / max(labels, 1), ± Monte Carlo SE. "
        "Each cell: `marginal / fcr / fcr+e`. Target: 0.05.",
        "",
        "| config | labels per run | false rate, all labels | false rate, routing labels "
        "(faithful, misleading, partial, through_sink) | judge() as-is: all / routing |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "False / labelled, summed over runs (marginal / fcr / fcr+e):",
        "",
        "| config | faithful | misleading | partial | through_sink | negligible |",
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in by_rows),
        "",
        "False-coverage rate of the intervals themselves (mean over runs of misses / selected, "
        "± SE): rho over the relevant heads with true e != 0 (marginal 95% vs BY level "
        "1 - alpha R/m, R = relevant); e over the BH-selected heads (marginal 95% vs "
        "1 - alpha R_bh/m).",
        "",
        "| config | rho, marginal | rho, FCR | e, marginal | e, FCR |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in cov_rows),
        "",
        *notes,
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
