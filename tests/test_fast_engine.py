"""The hook-free engine (``Engine(fast=True)``, the default) against the bridge path it
replaces (``fast=False``, kept as the reference): equal numbers on every bundled decoder
family, for every kind of edit, at every layer and query position; encoders stay on the bridge
with the reason recorded; a budget too small for one row is refused."""

import pytest
import torch

import lensattr
from lensattr.core.metrics import LogitDiff
from lensattr.core.prompts import PromptSet
from lensattr.core.types import HeadId
from lensattr.evidence import Engine
from lensattr.evidence.interventions import (
    Intervention,
    ablate,
    keep_only,
    patch_weights,
    remove_direct,
    remove_sources,
)

from .conftest import left_padded_prompts, sharp_gpt2
from .test_architectures import build, prompts


def mixed_interventions(eng: Engine, seed: int = 0) -> list[Intervention]:
    """Every kind of edit, each placed where it can move the metric: whole-head ablations (each
    method the prompts allow), ablations of the read row and of random position sets (with the
    read row in the last layer, where no other row is read), removal of each prompt's strongest
    edge at the read row (each baseline, renormalised or not), multi-edge removals at an earlier
    query row (at the read row in the last layer), weights-only edits of the same entries,
    keep-only the first real token, direct paths, combinations. Positions are relative to each
    prompt's first real token, so they sit on real tokens under left padding too."""
    g = torch.Generator().manual_seed(seed)
    a, n, p = eng.adapter, len(eng.prompts), eng.prompts.n_pos
    rows = torch.arange(n)
    pos = eng._read_pos(eng.readout)  # [batch]
    first = eng.prompts.valid.long().argmax(1)  # [batch] the first real token
    methods = ["zero"]
    if eng.prompts.corrupted is not None:
        methods.append("resample")
    if eng.prompts.aligned:
        methods.append("mean")
    read = torch.zeros(n, p, dtype=torch.bool)
    read[rows, pos] = True
    last_layer = a.n_layers - 1
    ivs = []
    for h in a.heads():
        m = methods[(h.layer + h.head) % len(methods)]
        ivs.append(ablate(h, method=m, label=f"ab-{m}-{h}"))
        ivs.append(ablate(h, method=m, rows=read, label=f"read-{h}"))
        some = torch.rand(n, p, generator=g) < 0.3
        if h.layer == last_layer:
            some |= read
        ivs.append(ablate(h, method=m, rows=some, label=f"some-{h}"))
        strongest = eng.patterns[h.layer][rows, h.head, pos].argmax(-1)  # [batch] key_pos
        one = torch.zeros(n, p, p, dtype=torch.bool)
        one[rows, pos, strongest] = True
        ivs.append(remove_sources(h, one, baseline=m, label=f"edge-{h}"))
        ivs.append(remove_sources(h, one, renormalise=True, label=f"renorm-{h}"))
        if h.layer < last_layer:
            q = first + int(torch.randint(1, int((pos - first).min()) + 1, (1,), generator=g))
        else:
            q = pos
        early = torch.zeros(n, p, p, dtype=torch.bool)
        for i in range(n):
            early[i, q[i], first[i] : first[i] + (q[i] - first[i]) // 2 + 1] = True
        ivs.append(remove_sources(h, early, baseline=m, label=f"early-{h}"))
        if m != "zero":  # weights-only: pattern patching of the same entries
            ivs.append(patch_weights(h, one, baseline=m, label=f"w-{h}"))
            ivs.append(patch_weights(h, early, baseline=m, label=f"wearly-{h}"))
        keep = torch.zeros(n, p, p, dtype=torch.bool)
        keep[rows, :, first] = True
        ivs.append(keep_only(h, keep, read, label=f"keep-{h}"))
        ivs.append(remove_direct(h, baseline=m, label=f"direct-{h}"))
        last = HeadId(last_layer, (h.head + 1) % a.n_heads)
        ivs.append(Intervention(f"combo-{h}", ablations=ablate(h, rows=read).ablations,
                                direct=(last,)))
    return ivs


def moving_fraction(values, clean, tol) -> float:
    """The share of finite cells (intervention x prompt) whose effect |value - clean| exceeds
    10 x ``tol``: where the fast-vs-bridge equality check can fail."""
    eff = (values - clean[None]).abs()
    finite = eff.isfinite()
    return float(((eff > 10 * tol) & finite).sum() / finite.sum())


def assert_fast_equals_bridge(model, ps, metric, atol=2e-5, min_moving=0.9):
    """Fast and bridge engines give the same numbers for :func:`mixed_interventions`, and at
    least ``min_moving`` of the cells move the metric by more than 10 x the tolerance."""
    fast = Engine(model, ps, metric, progress=False, batch_size=24)
    assert fast.fast, fast.fast_reason
    slow = Engine(model, ps, metric, progress=False, fast=False)
    ivs = mixed_interventions(fast)
    rf, rs = fast.run(ivs, track_heads=True), slow.run(ivs, track_heads=True)
    assert fast.n_rows["bare"] == len(ivs) * len(ps) and fast.n_rows["bridge"] == 0
    assert slow.n_rows["bare"] == 0
    torch.testing.assert_close(fast.clean, slow.clean, atol=1e-5, rtol=0)
    scale = rs.values.nan_to_num().abs().max().clamp(min=1)
    tol = atol * float(scale)
    frac = moving_fraction(rs.values, slow.clean, tol)
    n_nan = int(rs.values.isnan().sum())
    what = (f"{frac:.1%} of {rs.values.numel() - n_nan} finite cells move the metric by more "
            f"than 10 x the tolerance {tol:.2e} ({n_nan} NaN cells)")
    assert frac >= min_moving, f"the equality check below is nearly vacuous: only {what}"
    assert torch.equal(rf.values.isnan(), rs.values.isnan()), what
    torch.testing.assert_close(rf.values.nan_to_num(), rs.values.nan_to_num(), atol=tol,
                               rtol=0, msg=lambda m: f"{m}\n{what}")
    torch.testing.assert_close(rf.head_delta, rs.head_delta, atol=atol * 10, rtol=1e-4,
                               msg=lambda m: f"{m}\n{what}")
    return frac


@pytest.fixture(scope="module")
def gpt2():
    """A sharp random 2-layer, 4-head GPT-2 (see ``conftest.sharp_gpt2``)."""
    return sharp_gpt2("fast-gpt2")


def _model(family):
    return sharp_gpt2("fast-gpt2") if family == "gpt2" else build(family)


@pytest.mark.parametrize("family", ["neox", "llama-gqa"])
@pytest.mark.parametrize("pad", [False, True])
def test_rotary_families_equal_the_bridge(family, pad):
    """NeoX (rotary, parallel attention and MLP) and GQA Llama, both with initializer range 0.3
    (sharp), without and with right padding."""
    assert_fast_equals_bridge(build(family), prompts(pad=pad), LogitDiff())


def test_gpt2_families_equal_the_bridge(gpt2, random_prompts):
    assert_fast_equals_bridge(gpt2, random_prompts, LogitDiff())


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama-gqa"])
def test_left_padded_prompts_equal_the_bridge(family):
    """Left padding (pads before the BOS, roles moving with it): zero and resample ablations,
    edge removals, keep-only and direct paths, fast = bridge. Mean ablation is refused on both
    paths (the prompts are not aligned). The padding is real: changing the padded tokens
    changes nothing."""
    model, ps = _model(family), left_padded_prompts()
    assert not ps.aligned and int(ps.attention_mask[:, 0].sum()) < len(ps)
    assert_fast_equals_bridge(model, ps, LogitDiff())
    for fast in (True, False):
        eng = Engine(model, ps, LogitDiff(), progress=False, fast=fast)
        with pytest.raises(ValueError, match="mean ablation .* aligned"):
            eng.run([ablate((0, 1), method="mean")])
        with pytest.raises(ValueError, match="mean ablation .* aligned"):
            eng.run([remove_direct((0, 1), baseline="mean")])
    pad = ps.attention_mask == 0
    other = PromptSet(tokens=torch.where(pad, (ps.tokens + 7) % 49 + 1, ps.tokens),
                      attention_mask=ps.attention_mask, corrupted=ps.corrupted,
                      answers=ps.answers, wrong=ps.wrong, roles=ps.roles)
    a = Engine(model, ps, LogitDiff(), progress=False)
    b = Engine(model, other, LogitDiff(), progress=False)
    torch.testing.assert_close(a.clean, b.clean, atol=1e-5, rtol=0)
    ivs = [ablate((1, 2), rows=None, label="ab"), ablate((0, 3), method="resample", label="rs")]
    torch.testing.assert_close(a.run(ivs).values, b.run(ivs).values, atol=1e-5, rtol=0)


def test_left_padded_without_corrupted_prompts_equal_the_bridge(gpt2):
    """Zero ablations only (no corrupted prompts, not aligned): fast = bridge."""
    assert_fast_equals_bridge(gpt2, left_padded_prompts(corrupted=False), LogitDiff())


# planted-copy is hand-wired: most of its heads are inert, gated off or constant by
# construction (their edits leave the metric exactly clean on both paths), so only about a
# fifth of its cells can move; the sharp random models above carry the >= 90% check
@pytest.mark.parametrize("name,min_moving", [("planted-copy", 0.1), ("induction", 0.9)])
def test_bundled_models_equal_the_bridge(name, min_moving):
    task = lensattr.tasks.get(name)
    model = lensattr.load_model(task.model)
    assert_fast_equals_bridge(model, task.prompts(6, model=model), task.make_metric(),
                              min_moving=min_moving)


def test_an_edit_reaches_only_later_positions_and_layers(gpt2, random_prompts):
    eng = Engine(gpt2, random_prompts, LogitDiff(), progress=False)
    n, p = len(random_prompts), random_prompts.n_pos
    end = int(eng._read_pos(eng.readout).min())
    rm = torch.zeros(n, p, p, dtype=torch.bool)
    rm[:, 4, 1] = True
    assert eng._reach(remove_sources((1, 2), rm)) == (1, 4)
    assert eng._reach(ablate((0, 3))) == (0, 0)
    assert eng._reach(remove_direct((1, 0))) == (2, end)  # only the final residual


def test_encoder_stays_on_the_bridge_with_a_reason():
    from lensattr.core.metrics import HiddenCosineToClean

    eng = Engine(build("bert"), prompts(), HiddenCosineToClean(), progress=False)
    assert not eng.fast and "hidden" in eng.fast_reason
    r = eng.run([ablate((0, 1))])
    assert eng.n_rows == {"bare": 0, "bridge": len(eng.prompts)} and r.values.isfinite().all()


def test_memory_budget_bounds_chunks_and_refuses_too_small(gpt2, random_prompts):
    with pytest.raises(ValueError, match="memory_budget: .* cannot hold one row"):
        Engine(gpt2, random_prompts, LogitDiff(), progress=False, memory_budget=10)
    roomy = Engine(gpt2, random_prompts, LogitDiff(), progress=False)
    per = roomy._bytes_per_position
    tight = Engine(gpt2, random_prompts, LogitDiff(), progress=False,
                   memory_budget=per * random_prompts.n_pos * len(random_prompts))
    ivs = [ablate(h, label=str(h)) for h in roomy.adapter.heads()]
    order = list(range(len(ivs)))
    assert all(len(c) == 1 for c in tight._chunks(ivs, order))  # one full-length iv each
    assert max(len(c) for c in roomy._chunks(ivs, order)) > 1
    torch.testing.assert_close(tight.run(ivs).values, roomy.run(ivs).values)
    with pytest.raises(ValueError, match="batch_size"):
        Engine(gpt2, random_prompts, LogitDiff(), progress=False, batch_size=0)


@pytest.mark.parametrize("name", ["planted-copy", "induction"])
def test_audit_verdicts_equal_the_bridge_audit(name):
    """The whole audit on the hook-free engine gives the bridge engine's verdicts and numbers."""
    task = lensattr.tasks.get(name)
    model = lensattr.load_model(task.model)
    fast = lensattr.audit(model, task, n_prompts=10, progress=False)
    slow = lensattr.audit(model, task, n_prompts=10, progress=False, fast=False)
    assert fast.meta["engine"]["path"] == "hook-free" and slow.meta["engine"]["path"] == "bridge"
    assert fast.meta["engine"]["forward_work"] < slow.meta["engine"]["forward_work"]
    cols = ["verdict", "verdict_rule", "labels_by_baseline", "compensated_under", "carriers"]
    assert fast.heads[cols].equals(slow.heads[cols])
    # every number agrees; the rank correlations (agree_*) nearly: effects below the noise
    # floor (float32 rounding, where the two engines differ) rank as 0 on both, so only
    # near-ties between real effects can swap (without the floor: 0.14 apart on induction)
    num = list(fast.heads.select_dtypes("number").columns)
    agree = [c for c in num if c.startswith("agree_")]
    assert agree and fast.heads[num].isna().equals(slow.heads[num].isna())
    rest = [c for c in num if c not in agree]
    diff = (fast.heads[rest] - slow.heads[rest]).abs().max().max()
    assert diff < 1e-4, diff
    diff = (fast.heads[agree] - slow.heads[agree]).abs().max().max()
    assert diff < 0.05, diff
    assert fast.meta["effect_noise_floor"] == pytest.approx(slow.meta["effect_noise_floor"])


def test_screen_skips_only_what_no_verdict_reads():
    """screen='auto' runs no routing edit, row split or single edge of a head whose effect
    does not clear the null margin; every verdict, under every baseline, and every number
    that was measured equal the exhaustive audit's."""
    task = lensattr.tasks.get("planted-copy")
    model = lensattr.load_model(task.model)
    auto = lensattr.audit(model, task, n_prompts=12, progress=False)
    full = lensattr.audit(model, task, n_prompts=12, progress=False, screen="none")
    th, b = auto.meta["thresholds"]["delta"], auto.meta["primary_ablation"]
    gone = {tuple(h) for h in auto.meta["screening"]["not_located"][b]}
    assert gone and not any(full.meta["screening"]["not_located"].values())
    for _, row in auto.heads.iterrows():
        clears = row[f"ablation_{b}_lo"] > th or row[f"ablation_{b}_hi"] < -th
        assert ((row["layer"], row["head"]) in gone) == (not clears)
    cols = ["verdict", "verdict_rule", "labels_by_baseline", "compensated_under", "carriers",
            "effect_locus"]
    assert auto.heads[cols].equals(full.heads[cols])
    for m in auto.meta["ablation_methods"]:
        torch.testing.assert_close(auto.heads[f"routing_{m}"], full.heads[f"routing_{m}"],
                                   equal_nan=True)
    e_auto, e_full = auto.edges, full.edges
    skipped = e_auto[["layer", "head"]].apply(tuple, axis=1).isin(gone)
    col = "effect_remove"
    assert e_auto.loc[skipped, col].isna().all() and e_full.loc[skipped, col].notna().any()
    diff = (e_auto.loc[~skipped, col] - e_full.loc[~skipped, col]).abs().max()
    assert diff < 1e-9
    with pytest.raises(ValueError, match="screen: expected one of"):
        lensattr.audit(model, task, n_prompts=12, progress=False, screen="fast")
