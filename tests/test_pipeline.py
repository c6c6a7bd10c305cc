"""The audit as a staged pipeline (issue 18): typed evidence keys, config dataclasses, the
stages composed by hand equal ``audit()``, and ``Audit.verdict(head)`` records that the tables
are views of and that survive a save."""

from __future__ import annotations

import json
import math
import time

import pandas as pd
import pytest
import torch

import lensattr
from lensattr.auditing.config import AuditConfig
from lensattr.auditing.gather import gather, make_engine
from lensattr.auditing.judgement import head_results
from lensattr.auditing.plan import make_plan
from lensattr.auditing.records import RECORDS
from lensattr.auditing.run import tables
from lensattr.compare.judge import Effects
from lensattr.core.config import RunConfig
from lensattr.core.types import AblationMethod, HeadId
from lensattr.evidence import ablate
from lensattr.evidence.interventions import remove_sources
from lensattr.evidence.keys import EvidenceKey, Kind, key

H = HeadId(0, 1)
H2 = HeadId(1, 2)
N = 12


@pytest.fixture(scope="module")
def model():
    return lensattr.load_model("planted")


@pytest.fixture(scope="module")
def result(model):
    return lensattr.audit(model, "planted-copy", n_prompts=N, progress=False)


# ---- evidence keys ------------------------------------------------------------------------
@pytest.mark.parametrize("k, text", [
    (key(Kind.ABLATE, H, baseline="resample"), "resample:0.1"),
    (key(Kind.READ, H, baseline="zero"), "read-zero:0.1"),
    (key(Kind.OTHER, H, baseline="mean"), "other-mean:0.1"),
    (key(Kind.ROW, H, baseline="zero", row=4), "row4-zero:0.1"),
    (key(Kind.KEEP, H, baseline="resample"), "keep-resample:0.1"),
    (key(Kind.REMOVE, H, baseline="zero"), "remove-zero:0.1"),
    (key(Kind.SINK, H, baseline="zero"), "sink-zero:0.1"),
    (key(Kind.RENORM, H), "renorm:0.1"),
    (key(Kind.DIRECT, H, baseline="mean"), "direct-mean:0.1"),
    (key(Kind.EDGE, H, baseline="resample", source=3), "edge-resample:0.1@3"),
    (key(Kind.PATTERN, H, baseline="resample", source=0), "pattern-resample:0.1@0"),
    (key(Kind.PATTERN_READ, H, baseline="mean"), "pattern-read-mean:0.1"),
    (key(Kind.LOCUS_EDGE, H, baseline="zero", source=2), "locus-edge-zero:0.1@2"),
    (key(Kind.JOINT, H, H2, baseline="zero"), "joint-zero:0.1+1.2"),
    (EvidenceKey(Kind.REFERENCE), "reference:all-zero"),
])
def test_key_labels_are_the_display_names(k, text):
    assert str(k) == text
    assert k == EvidenceKey(k.kind, k.heads, k.baseline, k.source, k.row)  # frozen, by value
    assert hash(k) == hash(EvidenceKey(k.kind, k.heads, k.baseline, k.source, k.row))


@pytest.mark.parametrize("make, field", [
    (lambda: key("kep", H, baseline="zero"), "kind"),
    (lambda: key(Kind.KEEP, H), "baseline"),
    (lambda: key(Kind.RENORM, H, baseline="zero"), "baseline"),
    (lambda: key(Kind.EDGE, H, baseline="zero"), "source"),
    (lambda: key(Kind.KEEP, H, baseline="zero", source=1), "source"),
    (lambda: key(Kind.ROW, H, baseline="zero"), "row"),
    (lambda: key(Kind.JOINT, H, baseline="zero"), "heads"),
    (lambda: key(Kind.ABLATE, H, baseline="zeros"), "zeros"),
])
def test_bad_keys_are_refused_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_effects_take_keys_only_and_name_what_is_missing():
    m0 = torch.zeros(4)
    k = key(Kind.ABLATE, H, baseline="zero")
    eff = Effects({k: torch.ones(4)}, m0, torch.full((4,), 2.0))
    assert eff(k).value == pytest.approx(0.5)
    with pytest.raises(TypeError, match="EvidenceKey"):
        eff("zero:0.1")
    with pytest.raises(TypeError, match="EvidenceKey"):
        eff.get("keep-zero:0.1")
    missing = key(Kind.KEEP, H, baseline="zero")
    with pytest.raises(KeyError, match="keep-zero:0.1"):
        eff(missing)
    assert math.isnan(eff.get(missing).value)  # planned-but-skipped evidence: NaN, typed


def test_a_key_names_an_intervention_without_changing_what_it_is():
    k = key(Kind.ABLATE, H, baseline="resample")
    named = ablate(H, method=AblationMethod.RESAMPLE, label=k)
    plain = ablate(H, method=AblationMethod.RESAMPLE, label=str(k))
    assert named.key == k and named.label == str(k) and plain.key is None
    assert named.digest() == plain.digest()
    rm = torch.zeros(2, 3, 3, dtype=torch.bool)
    rm[:, 2, 0] = True
    a = remove_sources(H, rm, label=key(Kind.EDGE, H, baseline="zero", source=0))
    assert a.digest() == remove_sources(H, rm, label="x").digest()


# ---- configs ------------------------------------------------------------------------------
def test_config_equals_keywords_and_keywords_override(model, result):
    cfg = AuditConfig(n_prompts=N, seed=5, run=RunConfig(progress=False, batch_size=16))
    by_cfg = lensattr.audit(model, "planted-copy", config=cfg, seed=0)  # keyword wins
    pd.testing.assert_frame_equal(by_cfg.heads, result.heads)
    assert by_cfg.meta["seed"] == 0
    other = lensattr.audit(model, "planted-copy", config=cfg)
    assert other.meta["seed"] == 5 and other.meta["prompts_hash"] != result.meta["prompts_hash"]


def test_bad_configs_name_the_argument(model):
    with pytest.raises(TypeError, match="config: expected a AuditConfig"):
        lensattr.audit(model, "planted-copy", config={"seed": 1})
    with pytest.raises(TypeError, match="run: expected a RunConfig"):
        AuditConfig(run={"batch_size": 2})
    with pytest.raises(TypeError, match="thresholds"):
        AuditConfig(thresholds=0.1)
    with pytest.raises(TypeError, match="no field 'nope'"):
        RunConfig().options(nope=1)


# ---- stages -------------------------------------------------------------------------------
def test_stages_by_hand_equal_audit(model, result):
    plan = make_plan(model, "planted-copy", None,
                     AuditConfig(n_prompts=N, run=RunConfig(progress=False)))
    assert plan.primary == AblationMethod.RESAMPLE and len(plan.heads) == 14
    g = gather(plan, make_engine(plan))
    assert all(isinstance(k, EvidenceKey) for k in g.eff.values)
    records = head_results(plan, g)
    assert [r.head for r in records] == plan.heads
    got = tables(plan, g, records, time.time())
    pd.testing.assert_frame_equal(got.heads, result.heads)
    pd.testing.assert_frame_equal(got.edges, result.edges)


# ---- verdict records ----------------------------------------------------------------------
def test_tables_are_views_of_the_records(result):
    for row in result.heads.itertuples():
        v = result.verdict((row.layer, row.head))
        assert v.label == row.verdict and v.rule == row.verdict_rule
        assert v.baseline == result.meta["primary_ablation"]
        assert v.sentence == row.reason
        share = v.share
        assert (math.isnan(share) and math.isnan(row.verdict_share)) or \
            share == pytest.approx(row.verdict_share)
        assert len(v.holds) == N
        for b, lab in (x.split("=") for x in row.labels_by_baseline.split(",")):
            assert result.verdict((row.layer, row.head), b).label == lab


def test_records_survive_a_save_and_refuse_another_saves_tables(result, tmp_path):
    result.save(tmp_path / "a")
    back = lensattr.Audit.load(tmp_path / "a")
    for h, by in result.records.items():
        for b, v in by.items():
            w = back.verdict(h, b)
            assert (w.label, w.rule, w.reason, w.partner) == (v.label, v.rule, v.reason,
                                                              v.partner)
            assert torch.equal(torch.isnan(w.holds), torch.isnan(v.holds))
            assert torch.equal(torch.nan_to_num(w.holds), torch.nan_to_num(v.holds.float()))
            assert json.dumps(w.numbers) == json.dumps(v.numbers)
    doc = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert RECORDS not in doc["files"]  # the saved tables and audit.json are as before
    # a records file from another save is not read as this audit's
    other = json.loads((tmp_path / "a" / RECORDS).read_text())
    other["heads_csv_sha256"] = "0" * 64
    (tmp_path / "a" / RECORDS).write_text(json.dumps(other))
    with pytest.raises(ValueError, match="no verdict records"):
        lensattr.Audit.load(tmp_path / "a").verdict((0, 0))


def test_verdict_bad_input(result):
    with pytest.raises(ValueError, match="head: .*not audited"):
        result.verdict((5, 0))
    with pytest.raises(TypeError, match="head: expected"):
        result.verdict(3)
    with pytest.raises(ValueError, match="baseline: 'bogus'"):
        result.verdict((0, 0), "bogus")


# ---- one RunConfig for the engine, patching and AtP ------------------------------------------
def test_run_config_is_shared_by_engine_patching_and_atp(model):
    from lensattr.evidence import Engine

    task = lensattr.tasks.get("planted-copy")
    p = task.prompts(6, model=model)
    metric = task.metric()
    run = RunConfig(batch_size=5, progress=False, fast=False)
    eng = Engine(model, p, metric, run=run)
    assert (eng.batch_size, eng.progress, eng.fast) == (5, False, False)
    assert Engine(model, p, metric, run=run, batch_size=7).batch_size == 7  # keyword wins
    assert Engine(model, p, metric, progress=False).batch_size == 64  # the engine's default
    by_run = lensattr.activation_patching(model, p, metric, run=RunConfig(batch_size=3))
    by_kw = lensattr.activation_patching(model, p, metric, batch_size=3)
    assert torch.equal(by_run.values, by_kw.values)
    assert by_run.meta["path"] == by_kw.meta["path"]
    slow = lensattr.activation_patching(model, p, metric, run=RunConfig(fast=False))
    assert slow.meta["path"] == "bridge"
    a = lensattr.atp(model, p, metric, run=RunConfig(batch_size=4))
    assert a.meta["batch_size"] == 4
    assert lensattr.atp(model, p, metric).meta["batch_size"] == 32
    with pytest.raises(TypeError, match="run: expected a lensattr.RunConfig"):
        lensattr.atp(model, p, metric, run={"batch_size": 4})


def test_mode_name_breaks_ties_the_same_way_in_every_process():
    """Tied most-common sources (half the prompts each) are named by the first in prompt
    order, whatever PYTHONHASHSEED is: the SmolLM2 IOI audit's top_source columns differed
    between two runs of the same code before."""
    import subprocess
    import sys

    code = ("import torch, lensattr\n"
            "from lensattr.auditing.columns import _mode_name\n"
            "p = lensattr.PromptSet(tokens=torch.zeros(4, 6, dtype=torch.long), "
            "roles={'IO': torch.tensor([1, 1, 1, 1]), 'S1': torch.tensor([2, 2, 2, 2])})\n"
            "print(_mode_name(p, torch.tensor([2, 1, 2, 1])), "
            "_mode_name(p, torch.tensor([3, 4, 4, 3])))\n")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": ""}, check=True
                           ).stdout.strip() for seed in range(8)}
    assert outs == {"S1 pos3"}


def test_grad_forward_check_is_shared_by_adapters_of_one_model(monkeypatch):
    """The hook-free AtP forward is checked once per model and weights: a second Adapter (each
    lensattr.atp(bridge, ...) call makes one) rebuilds it without re-running the check, and
    gets the same scores."""
    from lensattr.evidence import grad_forward

    model = lensattr.load_model("planted")
    task = lensattr.tasks.get("planted-copy")
    p, metric = task.prompts(6, model=model), task.metric()
    calls = []
    check = grad_forward.GradForward.check

    def counted(self, *a, **k):
        calls.append(1)
        return check(self, *a, **k)

    monkeypatch.setattr(grad_forward.GradForward, "check", counted)
    first = lensattr.atp(model, p, metric)
    n = len(calls)
    assert n >= 1 and first.meta["path"] == "hook-free"
    again = lensattr.atp(model, p, metric)
    assert len(calls) == n and again.meta["path"] == "hook-free"
    assert torch.equal(first.heads, again.heads)
    with torch.no_grad():  # other weights: checked again
        next(model.parameters()).mul_(1.001)
    lensattr.atp(model, p, metric)
    assert len(calls) > n
