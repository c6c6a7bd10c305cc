"""The command line, end to end on the bundled default."""

import json

import pandas as pd

from lensattr.cli.main import main


def test_cli_audit_writes_the_four_files(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["audit", "--out", str(out), "--n-prompts", "12", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "faithful" in text and "misleading" in text and "compensated" in text
    heads = pd.read_csv(out / "heads.csv")
    assert len(heads) == 14 and "verdict" in heads.columns
    assert len(pd.read_csv(out / "edges.csv")) > 0
    meta = json.loads((out / "audit.json").read_text())["meta"]
    assert meta["n_prompts"] == 12 and meta["task"] == "planted-copy"
    page = (out / "report.html").read_text()
    assert "CircuitsVis.render" in page and "alice" in page or "bob" in page
    assert not (out / "evidence.ckpt.safetensors").exists()


def test_cli_lists(capsys):
    assert main(["models"]) == 0 and "planted" in capsys.readouterr().out
    assert main(["tasks"]) == 0 and "planted-copy" in capsys.readouterr().out


def test_cli_bad_task(capsys):
    assert main(["audit", "--task", "nope", "--quiet"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
