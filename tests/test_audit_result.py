"""Saved results (issue 12, item 13): Audit.load validates what it reads, partner columns
round-trip as integers or missing, and saving is atomic."""

import json
import os

import pandas as pd
import pytest
import torch

import lensattr.auditing.result as ar
from lensattr.auditing.result import Audit, AuditLoadError


def make_audit(verdict: str = "faithful") -> Audit:
    heads = pd.DataFrame({
        "layer": [0, 0, 0, 0, 1, 1, 1, 1],
        "head": [0, 1, 2, 3, 0, 1, 2, 3],
        "verdict": [verdict, "inert", "compensated", "", "null", "compensated", "x", "y"],
        "ablation_zero": [0.25, float("nan"), 1 / 3, -0.5, 0.0, 1e-9, 2.0, 3.5],
        "diffuse": [True, False, False, True, False, False, True, False],
        "partner_layer": [None, None, 1, None, None, 0, None, None],
        "partner_head": [None, None, 1, None, None, 2, None, None],
        "partner": ["", "", "L1H1", "", "", "L0H2", "", ""],
    })
    edges = pd.DataFrame({"layer": [0, 1], "head": [0, 2], "source_role": ["S1", "BOS"],
                          "effect_remove": [0.125, float("nan")]})
    tensors = {"clean_metric": torch.arange(8.0), "pattern_example": torch.rand(2, 4, 9, 9),
               "example_tokens": torch.arange(9)}
    return Audit(heads=heads, edges=edges, tensors=tensors,
                 meta={"model": "m", "task": "t", "n_prompts": 8})


def assert_same(a: Audit, b: Audit) -> None:
    pd.testing.assert_frame_equal(a.heads, b.heads, check_exact=True)
    pd.testing.assert_frame_equal(a.edges, b.edges, check_exact=True)
    assert a.meta == b.meta and a.tensors.keys() == b.tensors.keys()
    for k, v in a.tensors.items():
        torch.testing.assert_close(b.tensors[k], v, atol=0, rtol=0)


def test_round_trip_with_integer_partners(tmp_path):
    a = make_audit()
    assert str(a.heads.partner_layer.dtype) == "Int64"  # in memory too, not floats
    a.save(tmp_path)
    back = Audit.load(tmp_path)
    assert_same(a, back)
    assert str(back.heads.partner_head.dtype) == "Int64"
    assert back.heads.partner_layer.tolist()[2] == 1 and back.heads.partner_layer.isna().sum() == 6
    text = (tmp_path / "heads.csv").read_text()
    assert ",1,1,L1H1" in text and "1.0" not in text.split("\n")[3]
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert doc["n_rows"] == {"heads": 8, "edges": 2}
    assert doc["tensors"]["pattern_example"] == {"shape": [2, 4, 9, 9], "dtype": "float32"}


def test_partner_strings_from_older_tables_become_integers():
    a = make_audit()
    h = a.heads.copy()
    h["partner_layer"] = ["", "", "1.000", "", "", "0", "", ""]
    assert Audit(heads=h, edges=a.edges).heads.partner_layer.tolist()[2] == 1
    h["partner_layer"] = ["", "", "1.5", "", "", "0", "", ""]
    with pytest.raises(ValueError, match="'partner_layer' must hold integers or be missing"):
        Audit(heads=h, edges=a.edges)


def test_missing_column(tmp_path):
    make_audit().save(tmp_path)
    df = pd.read_csv(tmp_path / "heads.csv").drop(columns=["verdict"])
    df.to_csv(tmp_path / "heads.csv", index=False)
    with pytest.raises(AuditLoadError, match=r"heads.csv: missing columns \['verdict'\]"):
        Audit.load(tmp_path)


def test_half_written_csv(tmp_path):
    make_audit().save(tmp_path)
    lines = (tmp_path / "heads.csv").read_text().splitlines(keepends=True)
    (tmp_path / "heads.csv").write_text("".join(lines[:5]))  # header and 4 of 8 heads
    with pytest.raises(AuditLoadError, match="heads.csv: 4 rows, but audit.json records 8"):
        Audit.load(tmp_path)
    (tmp_path / "heads.csv").write_text("")
    with pytest.raises(AuditLoadError, match="heads.csv: not a readable CSV table"):
        Audit.load(tmp_path)


def test_truncated_tensors_file(tmp_path):
    make_audit().save(tmp_path)
    t = tmp_path / "tensors.safetensors"
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    with pytest.raises(AuditLoadError, match="tensors.safetensors: unreadable .*truncated"):
        Audit.load(tmp_path)


def test_tensor_names_and_shapes_checked(tmp_path):
    a = make_audit()
    a.save(tmp_path)
    from safetensors.torch import save_file

    save_file({"clean_metric": torch.arange(4.0), "pattern_example": torch.rand(2, 4, 9, 9),
               "example_tokens": torch.arange(9)}, str(tmp_path / "tensors.safetensors"))
    with pytest.raises(AuditLoadError, match=r"tensor 'clean_metric' has shape \[4\], but "
                                             r"audit.json records \[8\]"):
        Audit.load(tmp_path)
    save_file({"clean_metric": torch.arange(8.0)}, str(tmp_path / "tensors.safetensors"))
    missing = r"has no tensors \['pattern_example', 'example_tokens'\]"
    with pytest.raises(AuditLoadError, match=missing):
        Audit.load(tmp_path)


def test_bad_values_and_edits_are_named(tmp_path):
    make_audit().save(tmp_path)
    path = tmp_path / "heads.csv"
    good = path.read_text()
    path.write_text(good.replace("0.25", "abc", 1))
    with pytest.raises(AuditLoadError, match="column 'ablation_zero' cannot be read as float64"):
        Audit.load(tmp_path)
    path.write_text(good.replace("0.25", "0.26", 1))  # a well-formed edit after saving
    with pytest.raises(AuditLoadError, match="heads.csv: its contents differ from what "
                                             "audit.json records"):
        Audit.load(tmp_path)
    (tmp_path / "audit.json").write_text("{not json")
    with pytest.raises(AuditLoadError, match="audit.json: unreadable"):
        Audit.load(tmp_path)


def test_interrupted_first_save_does_not_load(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ar, "save_file", boom)  # dies after both CSVs were written
    with pytest.raises(KeyboardInterrupt):
        make_audit().save(tmp_path)
    with pytest.raises(AuditLoadError, match="no audit.json; not a saved audit"):
        Audit.load(tmp_path)
    assert os.listdir(tmp_path) == []  # no temporary files left behind


def test_interrupted_overwrite_keeps_the_old_audit_or_refuses(tmp_path, monkeypatch):
    old = make_audit("faithful")
    old.save(tmp_path)
    (tmp_path / "report.html").write_text("<p>kept</p>")
    real_save = ar.save_file

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ar, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        make_audit("misleading").save(tmp_path)
    assert_same(old, Audit.load(tmp_path))  # interrupted before the swap: the old audit
    monkeypatch.setattr(ar, "save_file", real_save)
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # heads.csv is in place, edges.csv is not
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(ar.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_audit("misleading").save(tmp_path)
    monkeypatch.setattr(ar.os, "replace", real_replace)
    with pytest.raises(AuditLoadError, match="audit.json: missing beside heads.csv.*interrupted"):
        Audit.load(tmp_path)
    new = make_audit("misleading")
    new.save(tmp_path)  # saving again over the wreck works
    assert_same(new, Audit.load(tmp_path))
    assert (tmp_path / "report.html").read_text() == "<p>kept</p>"
    assert sorted(os.listdir(tmp_path)) == ["audit.json", "edges.csv", "heads.csv",
                                            "report.html", "tensors.safetensors"]


def test_overwrite_and_older_folders(tmp_path):
    make_audit("faithful").save(tmp_path)
    new = make_audit("misleading")
    new.save(tmp_path)
    assert_same(new, Audit.load(tmp_path))
    doc = json.loads((tmp_path / "audit.json").read_text())
    for key in ("format", "n_rows", "tensors", "files"):  # what older versions did not write
        del doc[key]
    (tmp_path / "audit.json").write_text(json.dumps(doc))
    assert_same(new, Audit.load(tmp_path))
    with pytest.raises(AuditLoadError, match="does not exist or is not a folder"):
        Audit.load(tmp_path / "nope")
