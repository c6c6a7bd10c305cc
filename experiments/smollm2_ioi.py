"""Which of GPT-2 small's IOI roles (Wang et al. 2022) lensattr finds in SmolLM2-135M-Instruct.

Claims (what attention says; ``lensattr.claims.compute_claims`` on the clean IOI run and on
the ``repeat-tokens`` prompts): per head, mean attention END->IO, END->S1, END->S2, S2->S1
(duplicate-token) and S2->S1+1 (induction at S2), and the induction / previous-token scores
on repeated random tokens.

Evidence (what heads do; ``lensattr.evidence.Engine``, each prompt paired with its own
ABC-corrupted prompt): per head, the resample-ablation effect e = (m_abl - m0) / (m_c - m0)
of the IOI logit difference (0 = no change, 1 = as bad as the corrupted run), the direct
logit attribution DLA = m0 - m(direct path removed, final-norm scale frozen) in nats (what
the head writes straight into logit(IO) - logit(S) at END), and how much ablating it moves
the name movers' outputs at END (``track_heads``). Backup name movers: each head's DLA with
the name movers resample-ablated, minus its clean DLA (recomputed from the ablated run's
``hook_z`` and final-norm scale; on the clean run it equals the Engine's direct-path number,
checked below).

Roles are assigned by stated rules (``RULES``), not fitted to GPT-2's answer; every head is
listed with its numbers, so other cuts can be read off ``experiments/results/``.

    python experiments/smollm2_ioi.py                       # 32 prompts, ~15 min on 1 thread
    python experiments/smollm2_ioi.py --n-prompts 8 --audit   # + lensattr.audit of candidates
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing lensattr
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "experiments" / "results"
RULES = {
    "name_mover": "END->IO attention >= 0.15 and above END->(S1+S2), DLA >= 0.15 nats",
    "negative_name_mover": "END->IO attention >= 0.15 and DLA <= -0.15 nats",
    "s_inhibition": "END->S2 attention >= 0.15 (S2 above IO), resample effect >= 0.02, "
                    "and DLA below a third of its total effect in nats (acts through others)",
    "s_suppression": "not in GPT-2's IOI circuit: END->S2 attention >= 0.15 (S2 above IO) and "
                     "DLA >= 0.15 nats (attends S and writes against it straight into the "
                     "logits, like a copy-suppression head)",
    "duplicate_token": "S2->S1 attention >= 0.3, layer below the name movers",
    "induction": "S2->S1+1 attention >= 0.15 and induction score (repeated tokens) >= 0.3",
    "previous_token": "previous-token score (repeated tokens) >= 0.5",
    "backup_name_mover": "not an output head (name mover or S-suppression); DLA rises by >= "
                         "0.15 nats when the output heads are resample-ablated together",
}


def _att(P, prompts, q_role: str, k_pos) -> torch.Tensor:
    """[layer, head] mean attention from role q_role to key positions k_pos ([batch])."""
    rows = torch.arange(P.shape[0])
    return P[rows, :, :, prompts.roles[q_role], k_pos].mean(0)


def claims_ioi(engine, prompts):
    from lensattr.claims import compute_claims

    c = compute_claims(engine.patterns, prompts, prompts.roles["END"])
    P = c.patterns  # [batch, layer, head, q, k]
    r = prompts.roles
    return {"end_io": _att(P, prompts, "END", r["IO"]), "end_s1": _att(P, prompts, "END", r["S1"]),
            "end_s2": _att(P, prompts, "END", r["S2"]),
            "s2_s1": _att(P, prompts, "S2", r["S1"]),
            "s2_s1p1": _att(P, prompts, "S2", r["S1"] + 1),
            "end_bos": _att(P, prompts, "END", r["BOS"])}


def claims_repeated(model, n: int, seed: int = 0):
    import lensattr
    from lensattr.claims import compute_claims
    from lensattr.core.sites import Site
    from lensattr.models.adapter import Adapter

    p = lensattr.tasks.get("repeat-tokens").prompts(n, seed, model)
    _, store = Adapter(model).run_with_cache(p.tokens, sites=(Site.PATTERN,))
    pats = [store[(Site.PATTERN, layer)] for layer in range(model.cfg.n_layers)]
    return compute_claims(pats, p, p.roles["END"]).scores


def dla(adapter, prompts, hooks=None, part: str = "diff") -> torch.Tensor:
    """[layer, head] mean direct logit attribution of each head to logit(IO) - logit(S) at END
    (``part`` "io" / "s": to logit(IO) / logit(S) alone), through the final RMSNorm with the
    run's own scale: z @ W_O / scale * w . (u_IO - u_S)."""
    from lensattr.core.sites import Site

    store = {}
    adapter.forward(prompts.tokens, hooks=adapter.capture_hooks((Site.Z, Site.LN_FINAL_SCALE),
                                                                store, hooks))
    rows, end = torch.arange(len(prompts)), prompts.roles["END"]
    model = adapter.model
    w = model.ln_final.original_component.weight.detach()  # RMSNorm weight [d_model]
    W_U = model.W_U.detach()  # [d_model, d_vocab]
    u_io, u_s = W_U[:, prompts.answers].T, W_U[:, prompts.wrong].T  # [batch, d_model]
    direction = {"diff": u_io - u_s, "io": u_io, "s": u_s}[part] * w
    scale = store[(Site.LN_FINAL_SCALE, None)][rows, end]  # [batch, 1]
    out = []
    for layer in range(adapter.n_layers):
        z = store[(Site.Z, layer)][rows, end]  # [batch, head, d_head]
        o = torch.einsum("bhd,hdm->bhm", z, adapter.W_O(layer)) / scale[:, :, None]
        out.append(torch.einsum("bhm,bm->bh", o, direction).mean(0))
    return torch.stack(out)  # [layer, head]


def ablation_hooks(engine, heads):
    """Hooks replacing the heads' hook_z by the corrupted run's (what ``ablate(method=
    'resample')`` does inside the Engine), for a run outside the Engine."""
    from lensattr.core.sites import Site

    by_layer = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    hooks = {}
    for layer, hs in by_layer.items():
        zc = engine.z_corr[layer]

        def hook(z, hs=hs, zc=zc):
            z = z.clone()
            z[:, :, hs] = zc[:, :, hs].to(z.dtype)
            return z

        hooks[(Site.Z, layer)] = hook
    return hooks


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--audit", action="store_true", help="also lensattr.audit the candidates")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import lensattr
    from lensattr.core.types import AblationMethod, HeadId
    from lensattr.evidence import Engine, ablate, remove_direct
    from lensattr.evidence.sweeps import ablation_sweep
    from lensattr.models.adapter import Adapter

    t0 = time.time()
    model = lensattr.load_model("smollm2")
    ad = Adapter(model)
    task = lensattr.tasks.get("ioi")
    prompts = task.prompts(args.n_prompts, args.seed, model)
    engine = Engine(ad, prompts, task.metric(), progress=True)
    m0, mc = engine.clean.mean().item(), engine.corrupted.mean().item()
    heads = ad.heads()
    print(f"IOI: {len(prompts)} prompts, logit diff clean {m0:.3f}, corrupted {mc:.3f}")

    cl = claims_ioi(engine, prompts)
    rep = claims_repeated(model, 32, args.seed)
    res = engine.run(ablation_sweep(heads, AblationMethod.RESAMPLE), track_heads=True,
                     desc="resample each head")
    eff = ((res.values.mean(1) - m0) / (mc - m0)).reshape(ad.n_layers, ad.n_heads)
    direct = engine.run([remove_direct(h, label=f"direct:{h}") for h in heads], desc="direct")
    dla_engine = (m0 - direct.values.mean(1)).reshape(ad.n_layers, ad.n_heads)
    dla_clean = dla(ad, prompts)
    dla_io, dla_s = dla(ad, prompts, part="io"), dla(ad, prompts, part="s")
    check = (dla_clean - dla_engine).abs().max().item()
    print(f"DLA recomputed vs Engine direct path: max |diff| {check:.2e}")

    def val(t, h):
        return float(t[h.layer, h.head])

    rows = []
    for h in heads:
        rows.append({"head": str(h), "layer": h.layer, "index": h.head,
                     "effect": val(eff, h), "dla": val(dla_clean, h),
                     "dla_io": val(dla_io, h), "dla_s": val(dla_s, h),
                     "end_io": val(cl["end_io"], h), "end_s1": val(cl["end_s1"], h),
                     "end_s2": val(cl["end_s2"], h), "s2_s1": val(cl["s2_s1"], h),
                     "s2_s1p1": val(cl["s2_s1p1"], h), "end_bos": val(cl["end_bos"], h),
                     "induction": val(rep["induction"], h),
                     "prev_token": val(rep["previous_token"], h)})
    by = {r["head"]: r for r in rows}
    nm = [r for r in rows if r["end_io"] >= 0.15 and r["end_io"] > r["end_s1"] + r["end_s2"]
          and r["dla"] >= 0.15]
    nm.sort(key=lambda r: -r["dla"])
    supp = sorted((r for r in rows if r["end_s2"] >= 0.15 and r["end_s2"] > r["end_io"]
                   and r["dla"] >= 0.15), key=lambda r: -r["dla"])
    out_rows = sorted(nm + supp, key=lambda r: -r["dla"])  # the output heads
    nm_heads = [HeadId(r["layer"], r["index"]) for r in out_rows]
    first_nm = min((h.layer for h in nm_heads), default=ad.n_layers)
    roles = {"name_mover": nm, "s_suppression": supp}
    roles["negative_name_mover"] = sorted(
        (r for r in rows if r["end_io"] >= 0.15 and r["dla"] <= -0.15), key=lambda r: r["dla"])
    roles["s_inhibition"] = sorted(
        (r for r in rows if r["end_s2"] >= 0.15 and r["end_s2"] > r["end_io"]
         and r["effect"] >= 0.02 and r["dla"] < (m0 - mc) * r["effect"] / 3),
        key=lambda r: -r["effect"])
    roles["duplicate_token"] = sorted(
        (r for r in rows if r["s2_s1"] >= 0.3 and r["layer"] < first_nm), key=lambda r: -r["s2_s1"])
    roles["induction"] = sorted(
        (r for r in rows if r["s2_s1p1"] >= 0.15 and r["induction"] >= 0.3),
        key=lambda r: -r["induction"])
    roles["previous_token"] = sorted((r for r in rows if r["prev_token"] >= 0.5),
                                     key=lambda r: -r["prev_token"])

    # the output heads' outputs at END move when an upstream head is ablated: who feeds them?
    clean_norm = torch.stack([o.norm(dim=-1).mean(0) for o in engine.out_clean])  # [L, H]
    feeders = {}
    for target in nm_heads[:3]:
        li, hi = target
        moved = res.head_delta[:, li, hi] / clean_norm[li, hi]  # [intervention]
        for r, f in zip(rows, moved.tolist(), strict=True):
            r[f"moves_{target}"] = f
        ranked = sorted((r for r in rows if HeadId(r["layer"], r["index"]) != target),
                        key=lambda r: -r[f"moves_{target}"])
        feeders[str(target)] = [(r["head"], round(r[f"moves_{target}"], 3)) for r in ranked[:6]]
    # backups: DLA with the output heads ablated together, against the clean DLA
    backup_info = {}
    if nm_heads:
        dla_abl = dla(ad, prompts, ablation_hooks(engine, nm_heads))
        joint = engine.run([ablate(*nm_heads, method="resample", label="all-output-heads")])
        e_joint = (joint.values.mean().item() - m0) / (mc - m0)
        for r in rows:
            r["dla_nm_ablated"] = val(dla_abl, HeadId(r["layer"], r["index"]))
            r["dla_rise"] = r["dla_nm_ablated"] - r["dla"]
        names = {str(h) for h in nm_heads}
        roles["backup_name_mover"] = sorted(
            (r for r in rows if r["head"] not in names and r["dla_rise"] >= 0.15),
            key=lambda r: -r["dla_rise"])
        backup_info = {"name_movers_ablated": sorted(names), "joint_effect": e_joint,
                       "sum_of_single_effects": sum(r["effect"] for r in out_rows),
                       "total_dla_rise_others": float(sum(r["dla_rise"] for r in rows
                                                          if r["head"] not in names))}
    else:
        roles["backup_name_mover"] = []

    top_effect = sorted(rows, key=lambda r: -r["effect"])[:12]
    result = {"n_prompts": len(prompts), "seed": args.seed, "clean": m0, "corrupted": mc,
              "rules": RULES, "dla_check_max_abs_diff": check, "backup": backup_info,
              "feeders": feeders,
              "roles": {k: [r["head"] for r in v] for k, v in roles.items()},
              "top_effect": [r["head"] for r in top_effect], "heads": rows}
    if args.audit:
        cand = {HeadId(r["layer"], r["index"]) for v in roles.values() for r in v[:4]}
        cand |= {HeadId(r["layer"], r["index"]) for r in top_effect[:6]}
        a = lensattr.audit(model, task, heads=sorted(cand), n_prompts=min(args.n_prompts, 8),
                           seed=args.seed, progress=True)
        cols = ["layer", "head", "head_type", "ablation_resample", "routing", "verdict",
                "carriers", "partner"]
        result["audit"] = a.heads[cols].to_dict("records")
        for rec in result["audit"]:
            by[f"L{rec['layer']}H{rec['head']}"]["verdict"] = rec["verdict"]
    result["seconds"] = round(time.time() - t0, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2_ioi.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    cols = ["head", "effect", "dla", "dla_io", "dla_s", "end_io", "end_s1", "end_s2", "s2_s1",
            "s2_s1p1", "induction", "prev_token"]
    md = [f"# SmolLM2-135M-Instruct on IOI ({len(prompts)} prompts, seed {args.seed})", "",
          f"Logit diff clean {m0:.3f}, ABC-corrupted {mc:.3f}. Effect = resample-ablation "
          "effect (0 none, 1 = corrupted); DLA in nats (dla_io / dla_s: the parts on "
          "logit(IO) / logit(S)); attention columns are means over "
          "prompts; induction / prev_token from repeated random tokens.", "",
          "## Largest resample-ablation effects", "", table(top_effect, cols)]
    for role, rule in RULES.items():
        extra = ["dla_rise", "end_io"] if role == "backup_name_mover" else []
        md += ["", f"## {role.replace('_', ' ')}", "", f"Rule: {rule}.", ""]
        md += [table(roles[role][:10], cols + extra) if roles[role] else "(none)"]
    if feeders:
        md += ["", "## who moves the output heads", "",
               "Norm of the change of the output head's output at END when another head is "
               "resample-ablated, over its clean norm (``track_heads``):", ""]
        md += [f"* {t}: " + ", ".join(f"{h} {v:.3f}" for h, v in f) for t, f in feeders.items()]
    if backup_info:
        md += ["", f"Output heads ablated together ({', '.join(backup_info['name_movers_ablated'])}"
               f"): effect {backup_info['joint_effect']:.3f} vs sum of single effects "
               f"{backup_info['sum_of_single_effects']:.3f}; the other heads' DLA rises by "
               f"{backup_info['total_dla_rise_others']:.3f} nats in all."]
    if args.audit:
        md += ["", "## lensattr.audit of the candidates (8 prompts)", "",
               table(result["audit"], cols=["layer", "head", "head_type", "ablation_resample",
                                            "routing", "verdict", "carriers", "partner"])]
    (out / "smollm2_ioi.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out / 'smollm2_ioi.json'} and {out / 'smollm2_ioi.md'} in "
          f"{result['seconds']} s")


if __name__ == "__main__":
    main()
