"""``lensattr patch`` end to end on the bundled planted model: the files it writes, a run
interrupted by Ctrl-C that resumes from its checkpoint with the same numbers, and one-line
errors naming the flag."""

import json

import pandas as pd
import pytest

import lensattr
from lensattr.cli.main import main
from lensattr.evidence.patch_runs import PatchRuns
from lensattr.tasks.bundled import Task


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lensattr: error: "), err
    return err


def test_patch_writes_frame_meta_and_summary(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["patch", "--model", "planted", "--task", "planted-copy", "--by", "pos",
                 "--n-prompts", "8", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "activation patching of z by pos" in text and "layer=0 pos=6 head=3" in text
    frame = pd.read_csv(out / "patching.csv")
    assert len(frame) == 2 * 7 * 7 and {"layer", "pos", "head", "effect"} <= set(frame.columns)
    meta = json.loads((out / "patching.json").read_text())
    assert meta["task"] == "planted-copy" and meta["n_prompts"] == 8 and meta["by"] == "pos"
    assert not (out / "patching.ckpt.safetensors").exists()  # removed once the files exist
    # the same numbers as the library call
    model = lensattr.load_model("planted")
    task = lensattr.tasks.get("planted-copy")
    res = lensattr.activation_patching(model, task.prompts(n_prompts=8, model=model),
                                       task.metric(), site="z", by="pos")
    assert (frame["effect"] - res.to_frame()["effect"]).abs().max() == 0
    assert frame["effect"].abs().max() > 0.1  # the check can fail


def test_path_patching_from_the_cli(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["patch", "--sender", "0.3", "--receivers", "q,logits", "--n-prompts", "8",
                 "--memory-budget", "100000", "--out", str(out), "--quiet"]) == 0
    assert "path patching from sender 0.3" in capsys.readouterr().out
    frame = pd.read_csv(out / "patching.csv")
    assert set(frame["receiver"]) == {"q", "logits"} and len(frame) == 7 + 1
    meta = json.loads((out / "patching.json").read_text())
    assert meta["sender"] == [0, 3] and meta["memory_budget"] == 100000


def test_interrupted_patch_resumes(tmp_path, capsys, monkeypatch):
    args = ["patch", "--site", "pattern", "--by", "pos", "--n-prompts", "8", "--quiet"]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    F = json.loads((ref / "patching.json").read_text())["n_forwards"]
    real, calls = PatchRuns._run_rows, {"n": 0}

    def ctrl_c_at_the_third(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(PatchRuns, "_run_rows", ctrl_c_at_the_third)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "rerun the same command" in err and "patching.ckpt.safetensors" in err
    assert (out / "patching.ckpt.safetensors").exists() and not (out / "patching.csv").exists()
    monkeypatch.setattr(PatchRuns, "_run_rows", real)
    assert main([*args, "--out", str(out)]) == 0
    meta = json.loads((out / "patching.json").read_text())
    assert meta["n_forwards"] == F - 2 and meta["n_reused"] > 0  # two forwards were saved
    pd.testing.assert_frame_equal(pd.read_csv(out / "patching.csv"),
                                  pd.read_csv(ref / "patching.csv"))


@pytest.mark.parametrize("argv,flag", [
    (["--sender", "3"], "--sender: expected LAYER.HEAD such as 0.1, got '3'"),
    (["--sender", "99.0"], "--sender: layer 99 out of range"),
    (["--sender", "0.9"], "--sender: head 9 out of range"),
    (["--site", "mlp"], "--site: expected one of"),
    (["--by", "row"], "--by: expected one of"),
    (["--by", "dest_src"], "--by: dest_src applies to --site pattern only"),
    (["--sender", "0.1", "--site", "q"], "--site: applies to activation patching only"),
    (["--receivers", "q"], "--receivers: applies to path patching only"),
    (["--sender", "0.1", "--receivers", "q,o"], "--receivers: expected a comma list"),
    (["--direction", "up"], "--direction: expected one of denoising, noising"),
    (["--memory-budget", "0"], "--memory-budget: expected a positive integer"),
    (["--memory-budget", "10"], "--memory-budget: 10 bytes cannot hold one row"),
    (["--n-prompts", "0"], "--n-prompts: expected a positive integer"),
    (["--task", "nope"], "unknown task 'nope'"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, flag):
    n = [] if "--n-prompts" in argv else ["--n-prompts", "4"]
    assert main(["patch", *argv, *n, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert flag in one_line_error(capsys)


def test_task_without_corrupted_prompts(tmp_path, capsys, monkeypatch):
    planted = lensattr.tasks.get("planted-copy")

    def clean_only(n, seed, model):
        p = planted.make_prompts(n, seed, model)
        return lensattr.PromptSet(tokens=p.tokens, answers=p.answers, wrong=p.wrong,
                                  roles=p.roles, vocab=p.vocab)

    task = Task("clean-only", "no corrupted prompts", "planted", "-", clean_only,
                planted.make_metric)
    monkeypatch.setitem(lensattr.tasks.bundled._TASKS, "clean-only", task)
    assert main(["patch", "--task", "clean-only", "--n-prompts", "4",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--task: task 'clean-only' has no corrupted prompts" in one_line_error(capsys)
