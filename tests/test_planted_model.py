"""The planted model's head roles, asserted directly with TransformerLens hooks.

These numbers are the oracle the rest of lensattr is graded against, so they are pinned here.
"""

from __future__ import annotations

import json

import pytest
import torch

from lensattr.models.loading import boot_bridge, list_models
from lensattr.models.zoo.planted import (
    FILLERS,
    NAMES,
    PLANTED_TRUTH,
    ROLES,
    build_planted,
    planted_copy_data,
)

END, S1, DECOY, BOS = ROLES["END"], ROLES["S1"], ROLES["DECOY"], ROLES["BOS"]
B1, B2 = (0, 3), (1, 0)
P, Q = (0, 4), (1, 4)  # backup pair with a prompt-independent trigger (L0H4's constant tag K)


def metric(logits, data, repeats=1):
    """logit(A) - logit(B) at the last position, per prompt."""
    last = logits[:, -1]
    answer, wrong = data["answer"].repeat(repeats), data["wrong"].repeat(repeats)
    return (last.gather(1, answer[:, None]) - last.gather(1, wrong[:, None]))[:, 0]


# Ablation conditions, all run in ONE batched forward: {name: {(layer, head): source}} where
# source is "zero", "mean" (mean over the prompt set, per position) or "resample" (the value on
# the paired corrupted prompt).
CONDITIONS = {
    **{f"zero {h}": {h: "zero"} for h in [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]},
    **{f"{m} {name}": {h: m for h in heads}
       for m in ("zero", "mean", "resample")
       for name, heads in (("B1", [B1]), ("B2", [B2]), ("B1+B2", [B1, B2]),
                           ("P", [P]), ("Q", [Q]), ("P+Q", [P, Q]))},
}  # fmt: skip


@pytest.fixture(scope="module")
def run():
    hf, tok = build_planted()
    bridge = boot_bridge(hf, tok, "planted")
    data = planted_copy_data(32, seed=0)
    n, names = data["clean"].shape[0], list(CONDITIONS)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(data["clean"])
        corrupted_logits, corrupted_cache = bridge.run_with_cache(data["corrupted"])
        sources = {
            "zero": lambda layer: 0.0,
            "mean": lambda layer: cache[f"blocks.{layer}.attn.hook_z"].mean(0, keepdim=True),
            "resample": lambda layer: corrupted_cache[f"blocks.{layer}.attn.hook_z"],
        }
        seen = {}

        def replace_z(layer):
            def hook_fn(z, hook):  # z [batch, pos, head, d_head]; rows of condition c
                z = z.clone()
                for c, name in enumerate(names):
                    for (lay, head), how in CONDITIONS[name].items():
                        if lay == layer:
                            src = sources[how](layer)
                            src = src if how == "zero" else src[:, :, head]
                            z[c * n : (c + 1) * n, :, head] = src
                return z

            return hook_fn

        def save_pattern(pattern, hook):  # [condition * batch, head, query_pos, key_pos]
            seen["pattern"] = pattern.clone()

        hooks = [(f"blocks.{layer}.attn.hook_z", replace_z(layer)) for layer in (0, 1)]
        hooks.append(("blocks.1.attn.hook_pattern", save_pattern))
        ablated_logits = bridge.run_with_hooks(data["clean"].repeat(len(names), 1), fwd_hooks=hooks)
    m0 = metric(logits, data)
    deltas = (metric(ablated_logits, data, len(names)).view(len(names), n) - m0).unbind(0)
    layer1 = dict(zip(names, seen["pattern"].split(n), strict=True))
    return {
        "hf": hf, "bridge": bridge, "data": data, "logits": logits, "cache": cache, "m0": m0,
        "corrupted_metric": metric(corrupted_logits, data),
        "delta": dict(zip(names, deltas, strict=True)),
        "pattern_b1_zeroed": layer1["zero B1"], "layer1_pattern": layer1,
        "corrupted_cache": corrupted_cache,
    }  # fmt: skip


def end_pattern(cache, layer, head):
    return cache[f"blocks.{layer}.attn.hook_pattern"][:, head, END]  # [batch, key_pos]


def test_build_is_deterministic_and_leaves_rng_alone():
    state = torch.random.get_rng_state()
    a, _ = build_planted()
    assert torch.equal(state, torch.random.get_rng_state())
    b, _ = build_planted()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.lm_head.weight.data_ptr() != a.transformer.wte.weight.data_ptr()  # untied
    for block in a.transformer.h:  # MLPs are all zero
        assert all(float(p.detach().abs().max()) == 0.0 for p in block.mlp.parameters())
    assert "planted" in {m.name for m in list_models()}


def test_data_layout():
    d = planted_copy_data(64, seed=3)
    clean, corr = d["clean"], d["corrupted"]
    assert clean.shape == corr.shape == (64, 7) and clean.dtype == torch.long
    assert (clean[:, BOS] == 0).all() and torch.equal(clean[:, S1], d["answer"])
    assert torch.equal(clean[:, ROLES["S2"]], d["wrong"]) and (d["answer"] != d["wrong"]).all()
    assert torch.equal(clean[:, 2:], corr[:, 2:])
    assert ((corr[:, S1] != d["answer"]) & (corr[:, S1] != d["wrong"])).all()
    assert "then" not in FILLERS and len(NAMES) == 8
    assert torch.equal(planted_copy_data(64, seed=3)["clean"], clean)
    assert not torch.equal(planted_copy_data(64, seed=4)["clean"], clean)


def test_text_round_trips_through_to_tokens(run):
    d = run["data"]
    assert torch.equal(run["bridge"].to_tokens(d["text"]), d["clean"])
    assert torch.equal(run["bridge"].to_tokens(d["corrupted_text"]), d["corrupted"])


def test_bridge_logits_equal_hf(run):
    with torch.no_grad():
        hf_logits = run["hf"](run["data"]["clean"]).logits
    torch.testing.assert_close(run["logits"], hf_logits, atol=1e-4, rtol=0)


def test_layernorm_scale_is_nearly_constant(run):
    for name in ("blocks.0.ln1.hook_scale", "blocks.1.ln1.hook_scale", "ln_final.hook_scale"):
        s = run["cache"][name]
        assert float(s.max() / s.min() - 1) < 1e-3, name


@pytest.mark.parametrize(
    "layer, head, target",
    [
        (0, 0, {S1: 0.7, BOS: 0.1, 2: 0.1, 5: 0.1}),  # faithful
        (0, 1, {DECOY: 0.82, S1: 0.15, BOS: 0.03}),  # decoy
        (0, 2, {BOS: 0.95, 2: 0.025, 5: 0.025}),  # sink
        (0, 3, {S1: 0.9, BOS: 0.1}),  # backup primary
        (1, 0, {BOS: 1.0}),  # backup secondary, silenced by L0H3's tag
        (1, 1, {5: 0.95, END: 0.05}),  # previous token
        (1, 2, {j: 1 / 7 for j in range(7)}),  # uniform
        (1, 3, {END: 0.9, BOS: 0.1}),  # self
        (0, 4, {S1: 0.9, BOS: 0.1}),  # P: backup primary with a constant tag
        (1, 4, {BOS: 1.0}),  # Q: its backup, silenced by the constant tag
    ],
)
def test_attention_at_end(run, layer, head, target):
    pattern = end_pattern(run["cache"], layer, head)
    expected = torch.zeros(7)
    for j, p in target.items():
        expected[j] = p
    assert float((pattern - expected).abs().max()) < 0.01


def test_patterns_at_every_query(run):
    p0 = run["cache"]["blocks.0.attn.hook_pattern"]
    p1 = run["cache"]["blocks.1.attn.hook_pattern"]
    assert float(p0[:, 2, :, BOS].min()) >= 0.9  # sink
    assert float(end_pattern(run["cache"], *B2)[:, BOS].min()) >= 0.99
    for q in range(1, 7):
        assert float(p1[:, 1, q, q - 1].min()) >= 0.9  # previous token
        assert float(p1[:, 3, q, q].min()) >= 0.89  # self
    for head in (0, 1, 3, 4):  # faithful, decoy, B1 and P look at BOS away from END
        assert float(p0[:, head, :END, BOS].min()) > 0.99


def test_decoy_value_at_decoy_is_zero(run):
    v = run["cache"]["blocks.0.attn.hook_v"][:, :, 1]  # [batch, pos, d_head]
    out = v @ run["bridge"].W_O[0, 1].detach()  # what each source would write
    at_decoy, at_s1 = out[:, DECOY].norm(dim=-1), out[:, S1].norm(dim=-1)
    assert float(at_s1.min()) > 1.0
    assert bool((at_decoy < 1e-3 * at_s1).all())


def test_clean_and_corrupted_metric(run):
    assert float((run["m0"] - 16.0).abs().max()) < 0.05  # 4 + 3 + 5 + 4 (L0H4)
    assert float(run["corrupted_metric"].abs().max()) < 0.05


@pytest.mark.parametrize(
    "head, delta",
    [((0, 0), -4.0), ((0, 1), -3.0), ((0, 2), 0.0), ((1, 1), 0.0), ((1, 2), 0.0), ((1, 3), 0.0)],
)
def test_zero_ablation_deltas(run, head, delta):
    d = run["delta"][f"zero {head}"]
    tol = 0.05 if delta else 0.01
    assert float((d - delta).abs().max()) < tol


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_backup_pair_compensates(run, method):
    both = run["delta"][f"{method} B1+B2"]
    assert abs(float(both.mean()) + 5.0) < 0.1
    for alone in (run["delta"][f"{method} B1"], run["delta"][f"{method} B2"]):
        assert bool((alone.abs() <= 0.25 * both.abs()).all())


def test_b2_takes_over_when_b1_is_zeroed(run):
    clean = end_pattern(run["cache"], *B2)
    assert float(clean[:, BOS].min()) >= 0.99 and float(clean[:, S1].max()) < 1e-3
    ablated = run["pattern_b1_zeroed"][:, B2[1], END]
    assert float(ablated[:, S1].min()) >= 0.99


def test_truth_table():
    truth = json.loads(json.dumps(PLANTED_TRUTH))
    assert truth["model"] == "planted" and truth["task"] == "planted-copy"
    got = {(h["layer"], h["head"]): (h["verdict"], h["head_type"]) for h in truth["heads"]}
    assert got == {
        (0, 0): ("faithful", None), (0, 1): ("misleading", None), (0, 2): ("inert", "sink"),
        (0, 3): ("compensated", None), (1, 0): ("compensated", None),
        (1, 1): ("inert", "previous_token"), (1, 2): ("negligible", None),
        (1, 3): ("inert", "self"), (0, 4): ("faithful", None), (1, 4): ("inert", "sink"),
        (0, 5): ("inert", "self"), (0, 6): ("inert", "sink"), (1, 5): ("inert", "sink"),
        (1, 6): ("negligible", None),
    }  # fmt: skip
    partners = {(h["layer"], h["head"]): h["partner"] for h in truth["heads"]}
    assert partners[B1] == list(B2) and partners[B2] == list(B1)
    assert partners[P] == list(Q) and partners[Q] == list(P)
    under = {(h["layer"], h["head"]): h["compensated_under"] for h in truth["heads"]}
    assert under[B1] == under[B2] == ["zero", "mean", "resample"]
    assert under[P] == under[Q] == ["zero"]
    assert truth["contributions"] == {
        "faithful": 4.0, "decoy": 3.0, "backup": 5.0,
        "backup_constant": 4.0, "backup_constant_restore": 3.0, "gated_copy": 3.0,
    }  # fmt: skip


# ---- the backup pair that resample (and mean) ablation cannot see: P = L0H4, Q = L1H4 ----------


def test_p_tag_is_the_same_on_clean_and_corrupted(run):
    """P's constant tag (value dim 8 -> K) is identical on every clean and corrupted prompt."""
    z = run["cache"]["blocks.0.attn.hook_z"][:, :, P[1], len(NAMES)]  # [batch, pos]
    zc = run["corrupted_cache"]["blocks.0.attn.hook_z"][:, :, P[1], len(NAMES)]
    torch.testing.assert_close(z, torch.ones_like(z), atol=1e-4, rtol=0)
    torch.testing.assert_close(zc, z, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["resample", "mean"])
def test_pq_invisible_to_resample_and_mean(run, method):
    """Resample / mean ablation of P keeps its tag, so Q stays off: P alone moves the metric by
    its full contribution 4, Q changes nothing, and P+Q is P alone (no interaction)."""
    d = run["delta"]
    p_alone, q_alone, both = d[f"{method} P"], d[f"{method} Q"], d[f"{method} P+Q"]
    if method == "resample":  # the corrupted name C is neither A nor B: exactly -4 everywhere
        assert float((p_alone + 4.0).abs().max()) < 0.05
    else:  # the mean over prompts keeps 0.9 * mean U(name): -4 +- name frequencies
        assert abs(float(p_alone.mean()) + 4.0) < 0.1 and float((p_alone + 4.0).abs().max()) < 0.5
    assert float(q_alone.abs().max()) < 0.01
    assert float((both - p_alone).abs().max()) < 0.01
    q_end = run["layer1_pattern"][f"{method} P"][:, Q[1], END]
    assert float(q_end[:, S1].max()) < 1e-3 and float(q_end[:, BOS].min()) >= 0.99


def test_pq_is_a_backup_pair_under_zero_ablation(run):
    """Zeroing P removes its tag: Q attends S1 and restores 3 of P's 4, so P alone moves the
    metric by only -1, while P and Q together remove both (-4): interaction -3."""
    d = run["delta"]
    p_alone, q_alone, both = d["zero P"], d["zero Q"], d["zero P+Q"]
    assert float((p_alone + 1.0).abs().max()) < 0.05
    assert float(q_alone.abs().max()) < 0.01
    assert float((both + 4.0).abs().max()) < 0.05
    interaction = both - p_alone - q_alone  # in metric units; normalised by m_c - m0 < 0: +3/16
    assert float((interaction + 3.0).abs().max()) < 0.05


def test_q_takes_over_only_when_p_is_zeroed(run):
    clean = end_pattern(run["cache"], *Q)
    assert float(clean[:, BOS].min()) >= 0.99 and float(clean[:, S1].max()) < 1e-3
    zeroed = run["layer1_pattern"]["zero P"][:, Q[1], END]
    assert float(zeroed[:, S1].min()) >= 0.99
    b2_untouched = run["layer1_pattern"]["zero P"][:, B2[1], END]  # the pairs do not interact
    assert float(b2_untouched[:, BOS].min()) >= 0.99
    q_untouched = run["layer1_pattern"]["zero B1"][:, Q[1], END]
    assert float(q_untouched[:, S1].max()) < 1e-3
