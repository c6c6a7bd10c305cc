"""Coverage of 95% intervals for a paired ratio of means, by simulation (issue 12, item 1).

The effect e = mean(num) / mean(den) over n prompts, num_i = m_int_i - m0_i and
den_i = m_ref_i - m0_i. Synthetic prompts: den_i = mu_b + noise (sd ``cv_b`` * |mu_b|);
num_i = theta * den_i + eps_i with eps correlated (rho = 0.5) with the denominator's noise, so
E[num] / E[den] = theta exactly. Scenarios: ``normal`` (bivariate normal), ``skewed`` (both
noises centred gamma(shape 2), skewness 1.4), ``heavy`` (Student t, 3 df, scaled to the same
sd), ``noisy_den`` (normal, den sd = |mu_b|, so some prompts' den is near 0 or flips sign).

Methods: ``percentile`` (the old lensattr interval: percentile bootstrap resampling prompts
jointly), ``bca`` (bias-corrected and accelerated, jackknife acceleration), ``student``
(bootstrap-t with the delta-method SE), ``delta_t`` (theta_hat +- t_{n-1} * delta-method SE) and
``fieller`` (Fieller's interval with t_{n-1}: :func:`lensattr.compare.ratio.fieller`).

Reported per (scenario, n): coverage pooled over theta in {0, 0.03, 0.1, 0.5} (unbounded
intervals count as covering), and the false-``null`` rate at theta = delta = 0.03: the share of
runs whose CI lies inside [-delta, delta] (nominal at most 2.5% for a 95% CI); for Fieller also
the TOST rate (BH-free ``tost_p < 0.05``, nominal at most 5%).

Run from the repository root: ``PYTHONPATH=. python experiments/ratio_ci_coverage.py`` (about
3 CPU-minutes for the defaults, 4000 runs per (scenario, n, theta), seed 0: the table quoted in
``lensattr.compare.stats.ratio_of_means``; ``--sims 500`` for a quick look).
"""

from __future__ import annotations

import argparse
import time

import torch

from lensattr.stats.ratio import fieller, t_ppf, tost_p

DELTA = 0.03
THETAS = (0.0, DELTA, 0.1, 0.5)
NORMAL = torch.distributions.Normal(0.0, 1.0)


def noise(kind: str, shape, gen) -> torch.Tensor:
    """Unit-variance, mean-zero noise."""
    if kind in ("normal", "noisy_den"):
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "skewed":  # gamma(2) via the sum of two exponentials: mean 2, var 2
        u = torch.rand((2, *shape), generator=gen, dtype=torch.float64)
        return (-torch.log(u).sum(0) - 2) / 2**0.5
    if kind == "heavy":  # t_3 = z / sqrt(chi2_3 / 3), var 3
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        chi = torch.randn((3, *shape), generator=gen, dtype=torch.float64).pow(2).sum(0)
        return z / (chi / 3).sqrt() / 3**0.5
    raise ValueError(kind)


def simulate(kind, theta, n, sims, gen, mu_b=-1.0, sd_eps=0.02, rho=0.5):
    cv_b = 1.0 if kind == "noisy_den" else 0.3
    zb, ze = noise(kind, (sims, n), gen), noise(kind, (sims, n), gen)
    den = mu_b + cv_b * abs(mu_b) * zb
    eps = sd_eps * (rho * zb + (1 - rho**2) ** 0.5 * ze)
    return theta * den + eps, den


def delta_se(a, b):
    """Delta-method SE of mean(a)/mean(b) over the last axis."""
    n = a.shape[-1]
    th = a.mean(-1) / b.mean(-1)
    d = a - th[..., None] * b
    return th, d.std(-1) / n**0.5 / b.mean(-1).abs()


def bootstrap(a, b, gen, n_boot):
    """Bootstrap replicates of the ratio and its delta-method SE: [sims, n_boot]."""
    sims, n = a.shape
    idx = torch.randint(0, n, (sims, n_boot, n), generator=gen)
    ab, bb = a[:, None, :].expand(-1, n_boot, -1), b[:, None, :].expand(-1, n_boot, -1)
    ab, bb = ab.gather(-1, idx), bb.gather(-1, idx)
    return delta_se(ab, bb)


def intervals(a, b, gen, n_boot):
    n = a.shape[-1]
    th, se = delta_se(a, b)
    out = {}
    bt, bse = bootstrap(a, b, gen, n_boot)
    bt = torch.where(torch.isfinite(bt), bt, th[:, None])
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    pq = torch.quantile(bt, q, dim=-1)
    out["percentile"] = (pq[0], pq[1])
    # BCa
    z0 = NORMAL.icdf(((bt < th[:, None]).double().mean(-1)).clamp(1e-6, 1 - 1e-6))
    keep = ~torch.eye(n, dtype=torch.bool)
    jack = (a[:, None, :].expand(-1, n, -1)[:, keep].reshape(-1, n, n - 1).mean(-1)
            / b[:, None, :].expand(-1, n, -1)[:, keep].reshape(-1, n, n - 1).mean(-1))
    dj = jack.mean(-1, keepdim=True) - jack
    acc = (dj**3).sum(-1) / (6 * (dj**2).sum(-1).pow(1.5)).clamp(min=1e-300)
    zs = NORMAL.icdf(q)
    adj = [NORMAL.cdf(z0 + (z0 + z) / (1 - acc * (z0 + z))) for z in zs]
    srt = bt.sort(-1).values
    pick = [(x.clamp(0, 1) * (bt.shape[-1] - 1)).round().long()[:, None] for x in adj]
    bca = [srt.gather(-1, i)[:, 0] for i in pick]
    out["bca"] = (bca[0], bca[1])
    # studentized (bootstrap-t)
    tstar = (bt - th[:, None]) / bse
    tstar = torch.where(torch.isfinite(tstar), tstar, torch.zeros_like(tstar))
    tq = torch.quantile(tstar, q, dim=-1)
    out["student"] = (th - tq[1] * se, th - tq[0] * se)
    t = t_ppf(0.975, torch.tensor(n - 1))
    out["delta_t"] = (th - t * se, th + t * se)
    _, lo, hi, _ = fieller(a, b)
    out["fieller"] = (lo, hi)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sims", type=int, default=4000, help="runs per (scenario, n, theta)")
    ap.add_argument("--boot", type=int, default=999)
    ap.add_argument("--ns", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--scenarios", nargs="+", default=["normal", "skewed", "heavy", "noisy_den"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    methods = ["percentile", "bca", "student", "delta_t", "fieller"]
    print(f"{args.sims} runs per (scenario, n, theta), {args.boot} bootstrap resamples; "
          f"coverage pooled over theta in {THETAS}; false null at theta = delta = {DELTA}\n")
    print("| scenario | n | " + " | ".join(f"{m} cov / null" for m in methods)
          + " | fieller TOST null |")
    print("|---" * (len(methods) + 3) + "|")
    t0 = time.time()
    for kind in args.scenarios:
        for n in args.ns:
            cov = {m: 0.0 for m in methods}
            null = {}
            tost = 0.0
            for theta in THETAS:
                hits = {m: 0 for m in methods}
                for start in range(0, args.sims, 250):
                    k = min(250, args.sims - start)
                    a, b = simulate(kind, theta, n, k, gen)
                    iv = intervals(a, b, gen, args.boot)
                    for m, (lo, hi) in iv.items():
                        cov[m] += float(((lo <= theta) & (theta <= hi)).sum())
                        if theta == DELTA:
                            hits[m] += int(((lo >= -DELTA) & (hi <= DELTA)).sum())
                    if theta == DELTA:
                        tost += float((tost_p(a, b, DELTA) < 0.05).sum())
                if theta == DELTA:
                    null = {m: hits[m] / args.sims for m in methods}
            total = args.sims * len(THETAS)
            cells = " | ".join(f"{cov[m] / total:.3f} / {null[m]:.3f}" for m in methods)
            print(f"| {kind} | {n} | {cells} | {tost / args.sims:.3f} |", flush=True)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
