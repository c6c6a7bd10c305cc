"""The audit's pattern-patching evidence against independent references: ``effect_pattern``
(edges) and ``pattern_read`` (heads) equal TransformerLens-convention pattern patching
(``activation_patching(site="pattern")``, noising) normalised like every effect;
``atp_pattern`` equals AtP's own pattern-entry scores; nothing is computed under the zero
baseline; the agreement table and meta carry the comparison."""

import math

import pytest
import torch

import lensattr
from lensattr.core.metrics import LogitDiff
from lensattr.evidence import activation_patching, atp

from .conftest import sharp_gpt2 as build_sharp_gpt2
from .test_architectures import prompts


def _close(got, want, atol):
    torch.testing.assert_close(torch.tensor(list(got), dtype=torch.float64),
                               torch.tensor(list(want), dtype=torch.float64), atol=atol, rtol=1e-4)


@pytest.fixture(scope="module")
def sharp_gpt2():
    return build_sharp_gpt2("sharp-gpt2", seed=3, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def audited(sharp_gpt2):
    ps = prompts(n=12)
    r = lensattr.audit(sharp_gpt2, ps, LogitDiff(), screen="none", progress=False,
                       claims=["raw"])
    return ps, r


def test_edges_equal_tl_pattern_patching(sharp_gpt2, audited):
    ps, r = audited
    ref = activation_patching(sharp_gpt2, ps, LogitDiff(), site="pattern", by="dest_src",
                              direction="noising")  # [layer, head, dest, src, batch]
    den = (ref.source - ref.base).mean()
    end = int(ps.roles["END"][0])
    e = r.edges[r.edges.query_role == "END"]
    assert len(e) == 8 * (end + 1) and r.meta["primary_ablation"] == "resample"
    want = [float((ref.values[L, H, end, s] - ref.base).mean() / den)
            for L, H, s in zip(e.layer, e["head"], e.source_pos, strict=True)]
    got = e.effect_pattern.to_numpy()
    _close(got, want, 1e-5)
    assert max(abs(x) for x in want) > 0.05  # the weights do matter somewhere
    assert (e.effect_pattern_lo <= e.effect_pattern + 1e-12).all()
    assert (e.effect_pattern <= e.effect_pattern_hi + 1e-12).all()
    # pattern patching is not edge removal: the values of the corrupted run are not used
    assert (e.effect_pattern - e.effect_remove).abs().max() > 0.05


def test_pattern_read_equals_tl_row_patching(sharp_gpt2, audited):
    ps, r = audited
    ref = activation_patching(sharp_gpt2, ps, LogitDiff(), site="pattern", by="pos",
                              direction="noising")  # [layer, head, dest, batch]
    den = (ref.source - ref.base).mean()
    end = int(ps.roles["END"][0])
    want = [float((ref.values[L, H, end] - ref.base).mean() / den)
            for L, H in zip(r.heads.layer, r.heads["head"], strict=True)]
    _close(r.heads.pattern_read.to_numpy(), want, 1e-5)


def test_atp_pattern_equals_atp_scores(sharp_gpt2, audited):
    ps, r = audited
    a = atp(sharp_gpt2, ps, LogitDiff(), mode="noising")
    den = float(r.tensors["corrupted_metric"].mean() - r.tensors["clean_metric"].mean())
    end = int(ps.roles["END"][0])
    e = r.edges[r.edges.query_role == "END"]
    want = [float(a.edges[:, L, H, end, s].mean()) / den
            for L, H, s in zip(e.layer, e["head"], e.source_pos, strict=True)]
    _close(e.atp_pattern.to_numpy(), want, 1e-6)
    agree = r.meta["atp"]["edge_agreement_with_exact"]
    assert agree["n_edges"] == len(e) and -1 <= agree["spearman"] <= 1
    # AtP is exact in the linear limit, and a single pattern entry is nearly linear here
    assert agree["spearman"] > 0.5


def test_agreement_rows_for_pattern_evidence(audited):
    _, r = audited
    ev = set(r.agreement.evidence)
    assert {"|edge removal effect|", "|edge pattern-patching effect|"} <= ev
    rows = r.agreement[r.agreement.evidence == "|edge pattern-patching effect|"]
    assert rows.rho.notna().any()


def test_zero_baseline_has_no_pattern_evidence(sharp_gpt2):
    ps = prompts(n=12)
    r = lensattr.audit(sharp_gpt2, ps, LogitDiff(), ablation="zero", screen="none",
                       progress=False, claims=["raw"], heads=[(1, 0), (1, 1)])
    assert r.edges.effect_pattern.isna().all() and r.heads.pattern_read.isna().all()
    assert "|edge pattern-patching effect|" not in set(r.agreement.evidence)
    assert "pattern_edit" in r.meta


def test_screened_heads_get_nan_and_the_rest_agree(sharp_gpt2, audited):
    ps, full = audited
    r = lensattr.audit(sharp_gpt2, ps, LogitDiff(), progress=False, claims=["raw"])
    skipped = {tuple(h) for h in r.meta["screening"]["not_located"]["resample"]}
    for (L, H), g in r.edges.groupby(["layer", "head"]):
        f = full.edges[(full.edges.layer == L) & (full.edges.head == H)]
        if (L, H) in skipped:
            assert g.effect_pattern.isna().all()
        else:
            _close(g.effect_pattern.to_numpy(), f.effect_pattern.to_numpy(), 1e-6)
    assert not math.isnan(r.heads.pattern_read.max()) or len(skipped) == 8
