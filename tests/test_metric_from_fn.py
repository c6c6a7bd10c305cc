"""Metric.from_fn: a user's own metric that declares the position (and columns) it reads gives
LogitDiff's values and audit, keeps the hook-free engine; a plain callable is warned about."""

import json
import warnings

import pandas as pd
import pytest
import torch

import lensattr
from lensattr.core.metric import FnMetric, Metric, MetricError, MetricWarning
from lensattr.core.metrics import LogitDiff, LogitsMetric, as_metric, read_rows
from lensattr.core.prompts import PromptSet
from lensattr.evidence import Engine, ablate

HEADS = [(0, 0), (0, 1), (0, 3), (1, 0)]
N = 8


@pytest.fixture(scope="module")
def model():
    return lensattr.load_model("planted")


@pytest.fixture(scope="module")
def prompts(model):
    return lensattr.tasks.get("planted-copy").prompts(N, 0, model)


def answer_wrong(p):
    return torch.stack([p.answers, p.wrong], 1)


def ld_cols(logits):  # TransformerLens's convention: logits only; here [batch, 2]
    return logits[:, 0] - logits[:, 1]


def ld_vocab(logits, prompts):  # [batch, d_vocab] at END
    a = logits.gather(1, prompts.answers[:, None].to(logits.device))
    w = logits.gather(1, prompts.wrong[:, None].to(logits.device))
    return (a - w)[:, 0]


def all_logits_ld(logits, prompts):  # a plain callable on [batch, pos, d_vocab]
    return ld_vocab(logits[:, -1], prompts)


def test_from_fn_equals_logit_diff_on_engine(model, prompts):
    ivs = [ablate(h) for h in HEADS]
    ref = Engine(model, prompts, LogitDiff(), progress=False)
    cols = Engine(model, prompts, Metric.from_fn(ld_cols, columns=answer_wrong), progress=False)
    vocab = Engine(model, prompts, Metric.from_fn(ld_vocab, position="END"), progress=False)
    assert cols.readout.kind == "columns" and vocab.readout.kind == "logits"
    assert torch.equal(cols.clean, ref.clean) and torch.equal(cols.corrupted, ref.corrupted)
    assert torch.equal(cols.run(ivs).values, ref.run(ivs).values)  # the same readout: bit for bit
    torch.testing.assert_close(vocab.clean, ref.clean, atol=1e-4, rtol=0)
    torch.testing.assert_close(vocab.run(ivs).values, ref.run(ivs).values, atol=1e-4, rtol=0)
    assert ref.fast and cols.fast and vocab.fast  # the hook-free engine stays on
    plain = Engine(model, prompts, LogitsMetric(all_logits_ld), progress=False)
    torch.testing.assert_close(plain.clean, ref.clean, atol=1e-4, rtol=0)
    assert not plain.fast and "all_logits" in plain.fast_reason


def test_from_fn_audit_equals_logit_diff_audit(model, tmp_path):
    kw = dict(n_prompts=N, heads=HEADS, progress=False)
    ref = lensattr.audit(model, "planted-copy", LogitDiff(), **kw)
    got = lensattr.audit(model, "planted-copy", Metric.from_fn(ld_cols, columns=answer_wrong),
                         **kw)
    pd.testing.assert_frame_equal(got.heads, ref.heads)
    pd.testing.assert_frame_equal(got.edges, ref.edges)
    assert got.meta["metric"]["class"] == "FnMetric"
    assert got.meta["metric"]["fn"].endswith("ld_cols")
    got.save(tmp_path)  # the description is JSON
    assert json.dumps(got.meta["metric"])


def test_read_rows_and_warning(prompts):
    ref = read_rows(LogitDiff(), prompts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # from_fn reads one row and says nothing
        got = read_rows(Metric.from_fn(ld_vocab), prompts)
        at = read_rows(Metric.from_fn(ld_vocab, position="S2"), prompts)
    assert torch.equal(got, ref) and int(got.sum()) == N
    assert at[torch.arange(N), prompts.roles["S2"]].all() and int(at.sum()) == N
    with pytest.warns(MetricWarning, match=r"'all_logits_ld' reads every position.*"
                                           r"Metric.from_fn\(fn, position=\"END\"\)"):
        rows = read_rows(as_metric(all_logits_ld), prompts)
    assert torch.equal(rows, prompts.valid)


def test_no_warning_for_metrics_that_declare_every_position(prompts):
    class Pooled(LogitsMetric):
        reads_every_position = True

    p1 = PromptSet(tokens=prompts.tokens[:, :1], answers=prompts.answers, wrong=prompts.wrong)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_rows(Pooled(all_logits_ld), prompts)
        read_rows(as_metric(all_logits_ld), p1)  # one-token prompts: nothing else to read
    assert lensattr.core.metrics.PairCosine.reads_every_position


def test_audit_with_plain_callable_warns(model):
    with pytest.warns(MetricWarning, match="from_fn"):
        lensattr.audit(model, "planted-copy", all_logits_ld, n_prompts=N, heads=[(0, 0)],
                       progress=False, screen="auto")


def test_scalar_fn_is_refused_with_the_fix(model, prompts):
    mean_ld = Metric.from_fn(lambda logits: ld_cols(logits).mean(), columns=answer_wrong,
                             name="mean_ld")
    with pytest.raises(MetricError, match=r"'mean_ld'.*one number for the whole batch.*"
                                          r"drop the \.mean\(\)"):
        Engine(model, prompts, mean_ld, progress=False)
    item = Metric.from_fn(lambda logits: ld_cols(logits).mean().item(), columns=answer_wrong,
                          name="item_ld")
    with pytest.raises(MetricError, match=r"'item_ld'.*returned float.*\.item\(\)"):
        Engine(model, prompts, item, progress=False)
    plain = LogitsMetric(lambda logits, q: all_logits_ld(logits, q).mean(), name="plain_mean")
    with pytest.raises(MetricError, match=r"'plain_mean'.*shape \(\).*drop a final \.mean\(\)"):
        Engine(model, prompts, plain, progress=False)


def test_closure_over_the_batch_is_refused(model, prompts):
    rows, ans, wrong = torch.arange(N), prompts.answers, prompts.wrong

    def captured(logits):  # per-prompt answers from outside: wrong on the engine's chunks
        return logits[rows, ans] - logits[rows, wrong]

    with pytest.raises(MetricError, match="'captured'.*order of the rows.*`prompts`"):
        Engine(model, prompts, Metric.from_fn(captured), progress=False)
    tl = LogitsMetric(lambda logits: logits[rows, -1, ans] - logits[rows, -1, wrong], name="tl")
    assert tl.takes_prompts is False  # TransformerLens's metric(logits) is accepted ...
    with pytest.raises(MetricError, match="'tl'.*order of the rows"):  # ... but not a closure
        Engine(model, prompts, tl, progress=False)


def test_signature_detection():
    assert not FnMetric(lambda logits: logits[:, 0]).takes_prompts
    assert FnMetric(lambda logits, prompts: logits[:, 0]).takes_prompts
    assert FnMetric(lambda logits, p: logits[:, 0]).takes_prompts
    assert not FnMetric(lambda logits, answer_tokens=None: logits[:, 0]).takes_prompts
    assert FnMetric(lambda logits, prompts=None: logits[:, 0]).takes_prompts
    assert FnMetric(lambda *a: a[0][:, 0]).takes_prompts
    assert not LogitsMetric(lambda logits: logits[:, -1, 0]).takes_prompts
    assert "takes_prompts" not in vars(LogitsMetric(all_logits_ld))  # run keys unchanged
    with pytest.raises(MetricError, match="fn must take"):
        FnMetric(lambda a, b, c: a)
    with pytest.raises(MetricError, match="fn must take"):
        FnMetric(lambda: 0)


def test_positions_and_columns(model, prompts):
    ref = Engine(model, prompts, LogitDiff(), progress=False).clean
    end = prompts.roles["END"]
    for pos in (end, end.tolist(), int(end[0])):
        m = Metric.from_fn(ld_cols, position=pos, columns=answer_wrong)
        assert torch.equal(Engine(model, prompts, m, progress=False).clean, ref)
    assert Metric.from_fn(ld_cols, position=end, columns=answer_wrong).describe()[
        "position"] == end.tolist()
    fixed = Metric.from_fn(lambda logits: logits[:, 0] - logits[:, 1], columns=[5, 7],
                           name="five_minus_seven")
    vals = Engine(model, prompts, fixed, progress=False).clean
    vocab = Engine(model, prompts, Metric.from_fn(lambda logits: logits[:, 5] - logits[:, 7]),
                   progress=False).clean
    torch.testing.assert_close(vals, vocab, atol=1e-4, rtol=0)
    d = fixed.describe()
    assert d["columns"] == [5, 7] and d["position"] == "END" and d["name"] == "five_minus_seven"
    assert d["fn_args"] == "logits"


def test_bad_input_names_the_argument(model, prompts):
    with pytest.raises(MetricError, match="fn: expected a callable"):
        Metric.from_fn(3)
    with pytest.raises(MetricError, match="fn: got the Metric 'logit_diff'"):
        Metric.from_fn(LogitDiff())
    with pytest.raises(MetricError, match=r"position: metric 'ld_cols' reads role 'NOPE'.*END"):
        Engine(model, prompts, Metric.from_fn(ld_cols, position="NOPE"), progress=False)
    with pytest.raises(MetricError, match=r"position: 99 is out of range.*0\.\.6"):
        read_rows(Metric.from_fn(ld_cols, position=99), prompts)
    with pytest.raises(MetricError, match="position: -1 is out of range.*'END'"):
        Metric.from_fn(ld_cols, position=-1)
    with pytest.raises(MetricError, match="position: expected integer positions"):
        Metric.from_fn(ld_cols, position=[1.5] * N)
    with pytest.raises(MetricError, match=r"position: metric 'ld_cols' has 3 positions for 8"):
        read_rows(Metric.from_fn(ld_cols, position=[1, 2, 3]), prompts)
    padded = PromptSet(tokens=[[1, 2, 3], [1, 2, 0]], attention_mask=[[1, 1, 1], [1, 1, 0]])
    with pytest.raises(MetricError, match="position: 2 of prompt 1 is padding in attention_mask"):
        read_rows(Metric.from_fn(ld_cols, position=2), padded)
    with pytest.raises(MetricError, match="columns: ids must be >= 0"):
        Metric.from_fn(ld_cols, columns=[-1, 2])
    with pytest.raises(MetricError, match="columns: expected integer ids"):
        Metric.from_fn(ld_cols, columns=[0.5])
    with pytest.raises(MetricError, match=r"columns: expected vocabulary ids.*shape \(3, 2\)"):
        Metric.from_fn(ld_cols, columns=lambda p: torch.zeros(3, 2, dtype=torch.long)
                       ).readout(prompts)
    with pytest.raises(MetricError, match=r"fn returned shape \(8, 2\), expected \(8,\)"):
        Engine(model, prompts, Metric.from_fn(lambda x: x, columns=answer_wrong), progress=False)
    nan = Metric.from_fn(lambda x: x[:, 0] * float("nan"), columns=answer_wrong, name="nan")
    with pytest.raises(MetricError, match="'nan'.*fn returned NaN or inf"):
        Engine(model, prompts, nan, progress=False)
