"""`lensattr report DIR`, `--version`, defaults in `--help`; the Audit's report inputs."""

from __future__ import annotations

import json
import re

import pytest

import lensattr
from lensattr.auditing.demo import synthetic_audit
from lensattr.cli.main import build_parser, main


def test_report_rebuilds_from_a_saved_audit(tmp_path, capsys):
    a = synthetic_audit(2, 3, 5, seed=2)
    a.save(tmp_path)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r" / "page.html")]) == 0
    assert "page.html" in capsys.readouterr().out
    page = (tmp_path / "r" / "page.html").read_text()
    data = json.loads(re.search(r"id='lensattr-data'>(.*?)</script>", page, re.S).group(1))
    assert [c["id"] for c in data["cards"]] == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    assert [v["name"] for v in data["views"]] == ["example prompt 0",
                                                  "mean over 16 prompts (positions of prompt 0)"]
    clean = float(a.tensors["clean_metric"].mean())
    assert f"clean {clean:.3g} → corrupted {clean - 3:.3g}" in page
    assert main(["report", str(tmp_path)]) == 0 and (tmp_path / "report.html").is_file()


def test_report_of_a_folder_without_audit(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "lensattr: error:" in err and "not a saved audit" in err


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["--version"])
    assert ex.value.code == 0 and capsys.readouterr().out.strip() == f"lensattr " \
        f"{lensattr.__version__}"
    sub = build_parser()._subparsers._group_actions[0].choices
    text = " ".join(re.sub(r"-\n\s+", "-", sub["audit"].format_help()).split())
    assert "(default: planted-copy)" in text and "(default: lensattr-out)" in text
    assert "(default: 0)" in text


def test_repr_html_is_summary_and_grid():
    a = synthetic_audit(3, 2, 4)
    h = a._repr_html_()
    assert "<script" not in h and h.count("class='v'") == 6
    assert "synthetic-3x2" in h and "effects under <b>resample</b> ablation" in h
