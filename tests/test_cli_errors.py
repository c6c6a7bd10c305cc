"""The command line turns expected errors into one line (exit 2), Ctrl-C into a resume hint
(exit 130), checks --out before any work, and refuses a task for another vocabulary."""

import os
import sys

import pytest

from lensattr.cli.common import CLIError, check_out
from lensattr.cli.main import main
from lensattr.core.metric import MetricError
from lensattr.core.prompts import PromptError
from lensattr.models.adapter import ModelError


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""
    import lensattr.models.loading

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(lensattr.models.loading, "load_model", boom)


@pytest.fixture
def fake_audit(monkeypatch):
    """Replace the audit by a function that raises what the test sets in ``raise_``."""
    audit_module = sys.modules["lensattr.auditing.run"]
    state = {}

    def fake(model, task, **kw):
        if "before" in state:
            state["before"](kw["checkpoint"])
        raise state["raise_"]

    monkeypatch.setattr(audit_module, "audit", fake)
    return state


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lensattr: "), err
    return err


def test_out_is_an_existing_file(tmp_path, capsys, no_model):
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    assert main(["audit", "--out", str(f), "--quiet"]) == 2
    assert "--out: " in one_line_error(capsys) and f.read_text() == "keep me"


def test_out_under_a_file_is_unwritable(tmp_path, capsys, no_model):
    f = tmp_path / "file"
    f.write_text("")
    assert main(["audit", "--out", str(f / "sub" / "out"), "--quiet"]) == 2
    assert "--out: cannot write to" in one_line_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_out_in_a_read_only_folder(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["audit", "--out", str(ro / "out"), "--quiet"]) == 2
        assert "--out: cannot write to" in one_line_error(capsys)
    finally:
        ro.chmod(0o700)


def test_check_out_leaves_nothing_behind(tmp_path):
    check_out(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "audit.json").write_text("{}")  # a previous audit: resumed, fine
    check_out(tmp_path / "prev")
    assert sorted(p.name for p in (tmp_path / "prev").iterdir()) == ["audit.json"]
    with pytest.raises(CLIError, match="--out: .* is an existing file"):
        check_out(tmp_path / "prev" / "audit.json")


@pytest.mark.parametrize("err", [
    ModelError("name_or_path: no such\nfolder"),
    PromptError("answers: bad"),
    MetricError("metric 'x': returned NaN"),
    ValueError("n_prompts: expected at least 1"),
    FileNotFoundError("directory: no audit.json"),
    PermissionError(13, "Permission denied", "out/heads.csv"),
])
def test_expected_errors_are_one_line(tmp_path, capsys, fake_audit, err):
    fake_audit["raise_"] = err
    assert main(["audit", "--model", "planted", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    line = one_line_error(capsys)
    assert "Traceback" not in line
    assert ("no such folder" in line) if isinstance(err, ModelError) else True
    if isinstance(err, PermissionError):
        assert "Permission denied: 'out/heads.csv'" in line


@pytest.mark.parametrize("err", [RuntimeError("a bug"), KeyError("not from the registry")])
def test_unexpected_errors_keep_their_traceback(tmp_path, fake_audit, err):
    fake_audit["raise_"] = err
    with pytest.raises(type(err)):
        main(["audit", "--model", "planted", "--out", str(tmp_path / "o"), "--quiet"])


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, fake_audit):
    out = tmp_path / "o"

    def write_ckpt(path):  # what the engine does after its first chunk
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()

    fake_audit.update(raise_=KeyboardInterrupt(), before=write_ckpt)
    assert main(["audit", "--model", "planted", "--out", str(out), "--quiet"]) == 130
    line = one_line_error(capsys)
    assert "same --out" in line and str(out) in line and "resume" in line


def test_ctrl_c_before_a_checkpoint(tmp_path, capsys, fake_audit):
    fake_audit["raise_"] = KeyboardInterrupt()
    assert main(["audit", "--model", "planted", "--out", str(tmp_path / "o"), "--quiet"]) == 130
    assert "no checkpoint was written yet" in one_line_error(capsys)


def test_missing_model_path_is_one_line(tmp_path, capsys):
    assert main(["audit", "--model", "./nope", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "name_or_path: no such file or folder './nope'" in one_line_error(capsys)


def test_model_with_another_vocabulary_than_the_task(tmp_path, capsys):
    """`lensattr audit --model attn2` keeps the default task planted-copy, whose ids mean
    nothing to attn2: refused with one line naming both and attn2's own tasks."""
    assert main(["audit", "--model", "attn2", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    line = one_line_error(capsys)
    assert "'planted-copy'" in line and "'planted'" in line and "model 'attn2'" in line
    assert "induction" in line
    assert not (tmp_path / "o").exists()
