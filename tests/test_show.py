"""``Audit.show``: notebook views of a real planted audit (content, not rendering; the browser
check is test_show_browser.py). References: the edges and heads tables, the verdict records,
and TransformerLens' own ``run_with_cache`` patterns."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch

import lensattr
from lensattr.core.metrics import LogitDiff
from lensattr.core.prompts import PromptSet
from lensattr.report import notebook
from lensattr.report.assets import circuitsvis_bundle

HOSTILE = "<script>window.__pwned=1</script>"


class _Tags(HTMLParser):
    """Start tags as (tag, attrs, classes), and the text inside each element with an id."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict, set]] = []

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        self.tags.append((tag, a, set(a.get("class", "").split())))


def tags(text: str) -> list[tuple[str, dict, set]]:
    p = _Tags()
    p.feed(text)
    return p.tags


@pytest.fixture(scope="module")
def model():
    return lensattr.load_model("planted")


@pytest.fixture(scope="module")
def audit(model):
    return lensattr.audit(model, "planted-copy", progress=False)


@pytest.fixture(scope="module")
def loaded(audit, tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    audit.save(d)
    return lensattr.Audit.load(d)


def _heads(a) -> list[tuple[int, int]]:
    return [(int(r.layer), int(r.head)) for r in a.heads.itertuples()]


def _expected_claimed(a, layer, head) -> set[str]:
    e = a.edges
    rows = e[(e["layer"] == layer) & (e["head"] == head) & (e["query_role"] == "END")]
    rows = rows[rows["query_pos"] == rows["query_pos"].iloc[0]]  # the read row, not locus rows
    return set(rows.loc[rows["claimed_share"] >= 0.5, "source_role"])


def test_claimed_sources_are_the_edges_with_claimed_share_at_least_half(audit):
    some_claimed = some_unclaimed = 0
    for layer, head in _heads(audit):
        v = audit.show((layer, head))
        t = tags(v.html)
        want = _expected_claimed(audit, layer, head)
        rows = {a["data-source"] for tag, a, c in t if tag == "tr" and "lensattr-src" in c
                and "claimed" in c}
        strip = [(a["data-source"], int(a["data-pos"])) for tag, a, c in t
                 if tag == "span" and "lensattr-tok" in c and "claimed" in c]
        assert rows == want == {s for s, _ in strip} == set(v.claimed), (layer, head)
        for name, pos in strip:  # the marked token is the source's own position
            src = audit.edges[(audit.edges["layer"] == layer) & (audit.edges["head"] == head)
                              & (audit.edges["source_role"] == name)]
            assert pos == int(src["source_pos"].iloc[0])
        props = json.loads(re.search(r"id='[^']*-props'>(.*?)</script>", v.html)[1])
        assert {i for i, t_ in enumerate(props["tokens"]) if t_.startswith("★")} == \
            {p for _, p in strip}
        some_claimed += bool(want)
        some_unclaimed += len([a for tag, a, c in t if tag == "tr" and "lensattr-src" in c
                               and "claimed" not in c]) > 0
    assert some_claimed >= 4 and some_unclaimed == len(audit.heads)
    # the planted mechanism: L0H0 claims S1, L0H1 attends the zero-value DECOY
    assert audit.show((0, 0)).claimed == ["S1"]
    assert audit.show((0, 1)).claimed == ["DECOY"]


def _evidence(view) -> dict[str, dict]:
    out, key = {}, None
    for tag, a, _ in tags(view.html):
        if tag == "tr" and "data-key" in a:
            key = a["data-key"]
        elif tag == "td" and key is not None:
            out[key], key = a, None
    return out


def _same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y


def test_evidence_numbers_equal_the_heads_table(audit):
    primary = audit.meta["primary_ablation"]
    for layer, head in _heads(audit):
        v = audit.show((layer, head))
        ev = _evidence(v)
        row = audit.heads[(audit.heads["layer"] == layer) & (audit.heads["head"] == head)].iloc[0]
        for key, col in (("effect", f"ablation_{primary}"), ("routing", "routing"),
                         ("sink_share", "sink_share")):
            for attr, suffix in (("data-value", ""), ("data-lo", "_lo"), ("data-hi", "_hi")):
                assert _same(float(ev[key][attr]), float(row[col + suffix])), (key, attr)
        for key in ("verdict", "carriers", "top_source", "head_type_read", "head_type"):
            assert html.unescape(ev[key]["data-value"]) == str(row[key]), key
        sentence = audit.verdict((layer, head)).sentence
        assert f"<p class='lensattr-sentence'>{html.escape(sentence)}</p>" in v.html
        assert f"data-verdict='{row['verdict']}'" in v.html
    assert {a.strip() for a in audit.heads["verdict"]} >= {"faithful", "misleading"}


def test_bundle_once_per_process_and_unique_ids(audit):
    marker = circuitsvis_bundle()[:120]
    notebook.resend_bundle()
    grid, v1, v2 = audit.show(), audit.show((0, 0)), audit.show((0, 1), prompt="mean")
    outs = [grid._repr_html_(), v1._repr_html_(), v2._repr_html_(), v1._repr_html_()]
    page = "".join(outs)
    assert page.count(marker) == 1 and page.count("data-lensattr-bundle") == 1
    assert marker in outs[1]  # the first view that draws a pattern carries it; the grid not
    assert marker not in v1.html and marker not in grid.html
    ids = re.findall(r" id='(lensattr-[^']*)'", page)
    assert len(ids) == len(set(ids)) >= 4 + 2 * 3  # one view twice: fresh ids, no collision
    notebook.resend_bundle()
    assert audit.show((0, 0))._repr_html_().count(marker) == 1  # forced into the next one


def test_save_writes_a_standalone_page(audit, tmp_path):
    marker = circuitsvis_bundle()[:120]
    page = audit.show((0, 1)).save(tmp_path / "sub" / "h.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count(marker) == 1
    assert "sourceMappingURL" not in page and "unpkg" not in page
    assert "http" not in page.replace(notebook.bundle_html(), "")  # no link of ours
    with pytest.raises(ValueError, match="path"):
        audit.show().save(tmp_path)


def test_prompt_3_matches_transformerlens(audit, model):
    prompts = lensattr.tasks.get("planted-copy").prompts(model=model)
    assert prompts.hash() == audit.meta["prompts_hash"]
    _, cache = model.run_with_cache(prompts.tokens)
    words = [model.tokenizer.decode([i]) for i in prompts.tokens[3].tolist()]
    assert words != audit.meta["example_text_tokens"]  # another prompt than prompt 0
    for layer, head in [(0, 0), (0, 1), (1, 1)]:
        v = audit.show((layer, head), prompt=3)
        want = cache["pattern", layer][3, head].numpy()
        np.testing.assert_allclose(v.pattern, want, atol=1e-6)
        props = json.loads(re.search(r"id='[^']*-props'>(.*?)</script>", v.html)[1])
        np.testing.assert_allclose(props["attention"], want, atol=1e-6)
        assert v.tokens == words and [t.lstrip("★") for t in props["tokens"]] == words
        assert html.escape(words[1]) in v.html
    assert not np.allclose(audit.show((1, 1), prompt=3).pattern,
                           audit.show((1, 1), prompt="mean").pattern)


def test_prompt_0_and_mean_after_load(audit, loaded):
    for prompt in (0, "mean"):
        a, b = audit.show((0, 1), prompt), loaded.show((0, 1), prompt)
        np.testing.assert_array_equal(a.pattern, b.pattern)
        assert a.tokens == b.tokens and a.claimed == b.claimed == ["DECOY"]
    np.testing.assert_array_equal(loaded.show((0, 1), "mean").pattern,
                                  loaded.tensors["pattern_mean"][0, 1].numpy())
    np.testing.assert_array_equal(loaded.show((0, 1)).pattern,
                                  loaded.tensors["pattern_example"][0, 1].numpy())
    assert loaded.prompt_patterns is None and audit.prompt_patterns is not None


def test_bad_prompt_is_refused_naming_it(audit, loaded):
    with pytest.raises(ValueError, match=r"prompt: 3 needs every prompt's .*available: 0 or "
                                         r"'mean'"):
        loaded.show((0, 0), prompt=3)
    for bad in (32, -1, "middle", True, 1.5):
        with pytest.raises(ValueError, match="prompt"):
            audit.show((0, 0), prompt=bad)
    big = dataclasses.replace(loaded, meta={**loaded.meta, "n_prompts": 10**6})
    with pytest.raises(ValueError, match=r"prompt: 5 .* MB, more than the 64 MB"):
        big.show((0, 0), prompt=5)
    assert lensattr.auditing.show.keep_patterns(
        torch.zeros(2, 1, 1, 3, 3), lensattr.tasks.get("planted-copy").prompts(2),
        torch.tensor([2, 2]), None, limit=71) is None  # 72 bytes > 71


def test_bad_head_is_refused_naming_it(audit):
    for bad, msg in (((2, 0), "out of range"), ((0, 7), "out of range"), ((0, -1), "out of"),
                     ("L9H9", "out of range"), ((0,), "expected"), ("x", "expected"),
                     ((True, 0), "expected"), (0, "expected")):
        with pytest.raises(ValueError, match=f"head: .*{msg}"):
            audit.show(bad)
    part = dataclasses.replace(audit, heads=audit.heads[audit.heads["head"] != 3])
    with pytest.raises(ValueError, match=r"head: \(0, 3\) was not audited"):
        part.show((0, 3))
    assert audit.show("L0H1").claimed == ["DECOY"]


def test_tokens_and_sentences_are_escaped(audit):
    toks = list(audit.meta["example_text_tokens"])
    toks[3] = HOSTILE
    heads = audit.heads.copy()
    heads["reason"] = HOSTILE
    heads["top_source"] = "'><img src=x onerror=alert(1)>"
    a = dataclasses.replace(audit, heads=heads, meta={**audit.meta, "example_text_tokens": toks},
                            records={}, prompt_patterns=None)
    for v in (a.show((0, 1)), a.show((0, 1), "mean"), a.show()):
        text = v._repr_html_().replace(circuitsvis_bundle(), "")
        assert HOSTILE not in text and "<img" not in text
    v = a.show((0, 1))
    assert html.escape(HOSTILE) in v.html  # shown as text: in the strip and the sentence
    assert v.tokens[3] == HOSTILE and v.claimed == ["DECOY"]
    props = re.search(r"id='[^']*-props'>(.*?)</script>", v.html)[1]
    assert "<" not in props and json.loads(props)["tokens"][3] == "★" + HOSTILE


@pytest.fixture(scope="module")
def unaligned(model):
    """planted-copy with every odd prompt shifted right by one padding token: the roles sit
    at other positions on odd prompts."""
    p = lensattr.tasks.get("planted-copy").prompts(16, model=model)
    n, length = p.tokens.shape
    shift = torch.arange(n) % 2
    toks, cor = torch.zeros(n, length + 1, dtype=torch.long), torch.zeros(n, length + 1,
                                                                         dtype=torch.long)
    mask = torch.zeros(n, length + 1, dtype=torch.long)
    for i in range(n):
        s = int(shift[i])
        toks[i, s:s + length], cor[i, s:s + length], mask[i, s:s + length] = \
            p.tokens[i], p.corrupted[i], 1
    q = PromptSet(tokens=toks, attention_mask=mask, corrupted=cor, answers=p.answers,
                  wrong=p.wrong, roles={k: v + shift for k, v in p.roles.items()}, vocab=p.vocab)
    assert not q.aligned
    return lensattr.audit(model, q, LogitDiff("END"), heads=[(0, 0), (0, 1)], progress=False), q


def test_roles_are_placed_on_each_prompt_when_not_aligned(unaligned, model, tmp_path):
    a, q = unaligned
    assert a.edges["source_pos"].isna().all()  # positions differ: only roles in the table
    for i in (0, 1, 3):
        v = a.show((0, 1), prompt=i)
        real = q.valid[i].nonzero()[:, 0].tolist()
        assert v.tokens == [model.tokenizer.decode([int(q.tokens[i, p])]) for p in real]
        marked = [int(at["data-pos"]) for tag, at, c in tags(v.html)
                  if tag == "span" and "claimed" in c]
        assert [real[p] for p in marked] == [int(q.roles["DECOY"][i])]
        assert v.pattern.shape == (len(real), len(real))
    with pytest.raises(ValueError, match="prompt: 'mean'"):
        a.show((0, 1), prompt="mean")
    a.save(tmp_path)
    b = lensattr.Audit.load(tmp_path)  # prompt 0's roles from the saved tokens table
    v = b.show((0, 1))
    assert v.claimed == ["DECOY"] and "Not marked" not in v.html
    assert [at["data-source"] for tag, at, c in tags(v.html) if tag == "span"
            and "claimed" in c] == ["DECOY"]
    blind = dataclasses.replace(b, tokens=pd.DataFrame())  # no record of prompt 0's roles
    v = blind.show((0, 1))
    assert "Not marked: BOS, S1, DECOY, S2" in v.html
    assert not [1 for tag, _, c in tags(v.html) if tag == "span" and "claimed" in c]


def test_every_view_carries_the_bundle_where_outputs_are_isolated(monkeypatch):
    """Google Colab renders each output in its own frame: a bundle shown once would not
    reach later views, so there each head view carries it."""
    import sys
    import types

    from lensattr.report import notebook

    view = notebook.head_view((0, 0), np.eye(2), ["a", "b"], [], [], prompt=0,
                              prompt_label="prompt 0")
    notebook.resend_bundle()
    assert "data-lensattr-bundle" in view._repr_html_()
    assert "data-lensattr-bundle" not in view._repr_html_()  # once per process
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert "data-lensattr-bundle" in view._repr_html_()
    assert "data-lensattr-bundle" in view._repr_html_()
