"""Patching sweeps resume from their checkpoint (nothing saved is recomputed, the numbers equal
an uninterrupted run's bit for bit), refuse another run's results with a warning naming what
differs, and fit a memory budget (same numbers, more forwards; a budget too small for one row
is refused, naming the minimum)."""

import pytest
import torch

from lensattr.core.metrics import AnswerLogProb, LogitDiff
from lensattr.core.prompts import PromptSet
from lensattr.evidence.checkpoint import EvidenceStore
from lensattr.evidence.patch_chunks import position_bytes
from lensattr.evidence.patch_runs import PatchRuns
from lensattr.evidence.patching import activation_patching, path_patching
from lensattr.models.adapter import Adapter

from .conftest import sharp_gpt2
from .test_architectures import build
from .test_architectures import prompts as _prompts

TOL = 1e-5  # as tests/test_patching.py: batched equals one at a time up to float32 rounding


def prompts():
    return _prompts(n=4, p=6)


@pytest.fixture(scope="module")
def gpt2():
    return sharp_gpt2("resume-gpt2")


@pytest.fixture(scope="module")
def llama():
    return build("llama-gqa")


class Interrupt(Exception):
    pass


@pytest.fixture
def interrupt_after(monkeypatch):
    """``interrupt_after(k)``: the (k+1)-th patched forward from now on raises Interrupt."""
    real = PatchRuns._run_rows

    def arm(k):
        calls = {"n": 0}

        def run_rows(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] > k:
                raise Interrupt
            return real(self, *a, **kw)
        monkeypatch.setattr(PatchRuns, "_run_rows", run_rows)
        return lambda: monkeypatch.setattr(PatchRuns, "_run_rows", real)
    return arm


@pytest.mark.parametrize("site,by", [("z", "pos"), ("pattern", "pos"), ("v", "all")])
def test_activation_patching_resumes_exactly(gpt2, tmp_path, interrupt_after, site, by):
    p, ck = prompts(), tmp_path / "ck.safetensors"
    kw = dict(site=site, by=by, batch_size=len(p))  # one cell per forward: many chunks
    full = activation_patching(gpt2, p, LogitDiff(), **kw)
    F = full.meta["n_forwards"]
    assert F > 4 and full.delta.abs().max() > 0.05
    disarm = interrupt_after(3)
    with pytest.raises(Interrupt):
        activation_patching(gpt2, p, LogitDiff(), checkpoint=ck, **kw)
    disarm()
    assert ck.exists()
    resumed = activation_patching(gpt2, p, LogitDiff(), checkpoint=ck, **kw)
    assert resumed.meta["n_forwards"] == F - 3  # only the missing cells ran
    assert resumed.meta["n_reused"] >= 3
    assert torch.equal(resumed.values, full.values)
    again = activation_patching(gpt2, p, LogitDiff(), checkpoint=ck, **kw)
    assert again.meta["n_forwards"] == 0 and again.meta["n_reused"] == full.values[..., 0].numel()
    assert torch.equal(again.values, full.values)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_path_patching_resumes_exactly(gpt2, llama, tmp_path, interrupt_after, family):
    model = gpt2 if family == "gpt2" else llama
    p, ck = prompts(), tmp_path / "ck.safetensors"
    full = path_patching(model, p, LogitDiff(), (0, 1), batch_size=len(p))
    F = full.meta["n_forwards"]
    disarm = interrupt_after(2)
    with pytest.raises(Interrupt):
        path_patching(model, p, LogitDiff(), (0, 1), batch_size=len(p), checkpoint=ck)
    disarm()
    resumed = path_patching(model, p, LogitDiff(), (0, 1), batch_size=len(p), checkpoint=ck)
    assert resumed.meta["n_forwards"] == F - 2 and resumed.meta["n_reused"] == 2
    for name in ("values", "logits", "pattern_change"):  # the watched rows come back too
        assert torch.equal(getattr(resumed, name).nan_to_num(7.0),
                           getattr(full, name).nan_to_num(7.0)), name
    assert full.pattern_change[0, 1].nan_to_num().abs().max() > 1e-3  # the check can fail
    again = path_patching(model, p, LogitDiff(), (0, 1), batch_size=len(p), checkpoint=ck)
    assert again.meta["n_forwards"] == 0


def test_a_cell_split_over_forwards_is_saved_only_when_whole(gpt2, tmp_path, interrupt_after):
    """Under a budget of one row per forward each cell takes one forward per prompt; an
    interrupt in the middle of the second cell keeps the first and reruns all of the second."""
    p, ck = prompts(), tmp_path / "ck.safetensors"
    n = len(p)
    kw = dict(site="z", by="all", memory_budget=position_bytes(Adapter(gpt2), p.n_pos) * p.n_pos)
    full = activation_patching(gpt2, p, LogitDiff(), **kw)
    F = full.meta["n_forwards"]
    assert F == full.values[..., 0].numel() * n  # one row per forward, none skipped
    disarm = interrupt_after(n + 1)
    with pytest.raises(Interrupt):
        activation_patching(gpt2, p, LogitDiff(), checkpoint=ck, **kw)
    disarm()
    resumed = activation_patching(gpt2, p, LogitDiff(), checkpoint=ck, **kw)
    assert resumed.meta["n_reused"] == 1 and resumed.meta["n_forwards"] == F - n
    assert torch.equal(resumed.values, full.values)


def test_another_run_gets_no_hits_and_says_why(gpt2, tmp_path):
    p, ck = prompts(), tmp_path / "ck.safetensors"
    first = activation_patching(gpt2, p, LogitDiff(), checkpoint=ck)
    assert first.meta["n_forwards"] > 0
    other = PromptSet(tokens=p.tokens, corrupted=p.corrupted.flip(0), answers=p.answers,
                      wrong=p.wrong)  # other corrupted prompts only
    changes = [("direction", dict(direction="noising")), ("metric", dict(metric=AnswerLogProb())),
               ("prompts", dict(prompts=other)), ("site", dict(site="q"))]
    for what, change in changes:
        kw = {"prompts": p, "metric": LogitDiff(), **change}
        with pytest.warns(UserWarning, match=f"no saved result is reused.*differs in {what}"):
            res = activation_patching(gpt2, kw.pop("prompts"), kw.pop("metric"),
                                      checkpoint=ck, **kw)
        assert res.meta["n_reused"] == 0 and res.meta["n_forwards"] > 0
    back = activation_patching(gpt2, p, LogitDiff(), checkpoint=ck)  # its entries were kept
    assert back.meta["n_forwards"] == 0 and torch.equal(back.values, first.values)
    pk = tmp_path / "path.safetensors"
    path_patching(gpt2, p, LogitDiff(), (0, 1), checkpoint=pk)
    with pytest.warns(UserWarning, match="differs in sender"):
        res = path_patching(gpt2, p, LogitDiff(), (0, 2), checkpoint=pk)
    assert res.meta["n_reused"] == 0
    with pytest.warns(UserWarning, match="differs in method"):  # one file, two kinds of sweep
        activation_patching(gpt2, p, LogitDiff(), checkpoint=pk)


def test_memory_budget_same_numbers_more_forwards(gpt2, llama):
    p = prompts()
    n, P = len(p), p.n_pos
    for model in (gpt2, llama):
        row = position_bytes(Adapter(model), P)
        free = activation_patching(model, p, LogitDiff(), site="z", by="pos")
        cell = activation_patching(model, p, LogitDiff(), site="z", by="pos",
                                   memory_budget=row * P * n)  # one full-length cell
        split = activation_patching(model, p, LogitDiff(), site="z", by="pos",
                                    memory_budget=row * P * 2)  # two full-length rows
        assert free.meta["n_forwards"] < cell.meta["n_forwards"] < split.meta["n_forwards"]
        assert cell.meta["memory_budget"] == row * P * n
        assert free.delta.abs().max() > 0.05  # the patches move the metric: the check can fail
        for res in (cell, split):  # other row counts per matmul: float32 rounding only
            torch.testing.assert_close(res.values, free.values, atol=TOL, rtol=0)
        pp = path_patching(model, p, LogitDiff(), (0, 1))
        small = path_patching(model, p, LogitDiff(), (0, 1), memory_budget=row * P)  # 1 row
        assert small.meta["n_forwards"] > pp.meta["n_forwards"]
        for name in ("values", "logits", "pattern_change"):  # prompts split, rows watched
            torch.testing.assert_close(getattr(small, name), getattr(pp, name), atol=TOL,
                                       rtol=0, equal_nan=True)


def test_budget_too_small_for_one_row(gpt2, tmp_path):
    p = prompts()
    need = position_bytes(Adapter(gpt2), p.n_pos) * p.n_pos  # a cell of position 0 runs all
    with pytest.raises(ValueError, match=f"memory_budget: {need - 1} bytes cannot hold one row"
                       f".*at least {need} bytes"):
        activation_patching(gpt2, p, LogitDiff(), site="z", by="pos", memory_budget=need - 1,
                            checkpoint=tmp_path / "ck.safetensors")
    assert not (tmp_path / "ck.safetensors").exists()  # refused before any forward
    res = activation_patching(gpt2, p, LogitDiff(), site="z", by="pos", memory_budget=need)
    assert res.meta["n_forwards"] > 0
    with pytest.raises(ValueError, match="memory_budget: .*at least"):
        path_patching(gpt2, p, LogitDiff(), (0, 1), memory_budget=need - 1)
    for bad in (0, -5, "1e6", 1.5, True):
        with pytest.raises(ValueError, match="memory_budget: expected a positive number"):
            activation_patching(gpt2, p, LogitDiff(), memory_budget=bad)


def test_path_patching_progress_bar(gpt2, capsys):
    path_patching(gpt2, prompts(), LogitDiff(), (0, 1), progress=True)
    assert "path patching" in capsys.readouterr().err
    path_patching(gpt2, prompts(), LogitDiff(), (0, 1))
    assert "path patching" not in capsys.readouterr().err


def test_store_refuses_unknown_run_key_components():
    parts = {k: "x" for k in ("config", "weights", "prompts", "metric", "engine")}
    EvidenceStore({**parts, "sender": "0.1"})
    with pytest.raises(ValueError, match=r"unknown components \['colour'\]"):
        EvidenceStore({**parts, "colour": "red"})
