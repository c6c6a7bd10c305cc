"""PromptSet.from_text: prompts from strings, tokenised as TransformerBridge.to_tokens does."""

import dataclasses

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lensattr
from lensattr.auditing.plan import with_bos_role
from lensattr.claims.head_types import sink_mask
from lensattr.core.prompts import PromptError, PromptSet, vocab_fingerprint
from lensattr.models.adapter import Adapter
from lensattr.models.zoo.smollm2 import load_tokenizer
from lensattr.tasks.text import ioi_prompts

PLANTED_TEXTS = ["erin went then", "heidi and then carol the ?", "frank", "bob to then erin ?"]
SMOL_TEXTS = ["When Mary and John went to the store,", " hi there", "A", "The capital of France is"]


@pytest.fixture(scope="module")
def planted():
    return lensattr.load_model("planted")


@pytest.fixture(scope="module")
def smollm2():
    return lensattr.load_model("smollm2")


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("bos", [None, True, False])
@pytest.mark.parametrize("which", ["planted", "smollm2"])
def test_tokens_equal_bridge_to_tokens(request, which, side, bos):
    model = request.getfixturevalue(which)
    texts = PLANTED_TEXTS if which == "planted" else SMOL_TEXTS
    p = PromptSet.from_text(model, texts, prepend_bos=bos, padding_side=side)
    ref = model.to_tokens(texts, prepend_bos=bos, padding_side=side).cpu()
    assert torch.equal(p.tokens, ref)
    lengths = [model.to_tokens(t, prepend_bos=bos).shape[1] for t in texts]  # unpadded, alone
    assert p.lengths.tolist() == lengths
    assert p.padding_side == side
    bos_on = model.cfg.default_prepend_bos if bos is None else bos
    assert ("BOS" in p.roles) == bos_on
    if bos_on:
        first = p.valid.long().argmax(1)
        assert torch.equal(p.roles["BOS"], first)
        assert (p.tokens[torch.arange(len(p)), first] == model.tokenizer.bos_token_id).all()
        assert p.text == tuple(model.tokenizer.bos_token + t for t in texts)
    else:
        assert p.text == tuple(texts)


def test_default_padding_side_is_the_tokenizers(smollm2):
    p = PromptSet.from_text(smollm2, SMOL_TEXTS)
    assert torch.equal(p.tokens, smollm2.to_tokens(SMOL_TEXTS).cpu())
    assert p.padding_side == smollm2.tokenizer.padding_side == "right"


def test_reference_ioi(smol_tok):
    tok = smol_tok
    ref = ioi_prompts(tok, 8)
    texts = [t.removeprefix(tok.bos_token) for t in ref.text]
    assert all(t != r for t, r in zip(texts, ref.text, strict=True))
    corrupted = [tok.decode(row[1:]) for row in ref.corrupted.tolist()]
    io = [tok.decode([a]) for a in ref.answers.tolist()]
    s = [tok.decode([w]) for w in ref.wrong.tolist()]
    p = PromptSet.from_text(tok, texts, corrupted, answers=io, wrong=s, name="ioi",
                            roles={"IO": io, "S1": (s, 0), "S2": (s, -1)})
    for k in ("tokens", "corrupted", "answers", "wrong"):
        assert torch.equal(getattr(p, k), getattr(ref, k)), k
    assert p.roles.keys() == ref.roles.keys()
    for k in ref.roles:
        assert torch.equal(p.roles[k], ref.roles[k]), k
    assert p.attention_mask is None and p.text == ref.text and p.name == "ioi"
    assert p.vocab == vocab_fingerprint(tok)


@pytest.mark.parametrize("side", ["left", "right"])
def test_roles_by_hand_planted(planted, side):
    # lengths with BOS: 4, 7, 2, 6 -> padded to 7
    p = PromptSet.from_text(planted, PLANTED_TEXTS, padding_side=side,
                            roles={"THEN": ["then", "then", "frank", "then"], "ONE": 1,
                                   "LAST": -1, "W": [2, 1, 0, -2]})
    pad = [3, 0, 5, 1] if side == "left" else [0, 0, 0, 0]
    own = {"THEN": [3, 3, 1, 3], "ONE": [1, 1, 1, 1], "LAST": [3, 6, 1, 5], "W": [2, 1, 0, 4],
           "BOS": [0, 0, 0, 0], "END": [3, 6, 1, 5]}
    for k, v in own.items():
        assert p.roles[k].tolist() == [a + b for a, b in zip(v, pad, strict=True)], k
    vocab = planted.tokenizer.get_vocab()
    assert (p.tokens[torch.arange(4), p.roles["THEN"]]
            == torch.tensor([vocab["then"]] * 2 + [vocab["frank"], vocab["then"]])).all()


@pytest.mark.parametrize("side", ["left", "right"])
def test_roles_land_on_tokens_smollm2(smol_tok, side):
    texts = ["When Mary and John met at the store, John gave a drink to", "Amy met John",
             "After John and Tom met at the park, Tom offered a pen to"]
    p = PromptSet.from_text(smol_tok, texts, padding_side=side,
                            roles={"S": ([" John", " John", " Tom"], -1), "SUBJ": " met",
                                   "J": (" John", 0), "PARK": [" store", "Amy", " park"]})
    rows = torch.arange(3)

    def words(role):
        return [smol_tok.decode([i]) for i in p.tokens[rows, p.roles[role]].tolist()]

    assert words("S") == [" John", " John", " Tom"]
    assert words("SUBJ") == [" met"] * 3
    assert words("J") == [" John"] * 3
    assert words("PARK") == [" store", "my", " park"]  # 'Amy' is ['A', 'my']: its last token
    assert p.roles["S"].tolist()[0] == 10 + (p.n_pos - 15 if side == "left" else 0)
    assert p.padding_side == side


def test_sink_under_left_padding_matches_the_audit(planted):
    p = PromptSet.from_text(planted, PLANTED_TEXTS, padding_side="left")
    bare = dataclasses.replace(p, roles={k: v for k, v in p.roles.items() if k != "BOS"})
    audited = with_bos_role(bare, Adapter(planted))  # what the audit adds to bundled tasks
    assert torch.equal(audited.roles["BOS"], p.roles["BOS"])
    assert p.roles["BOS"].tolist() == [3, 0, 5, 1]
    expect = torch.zeros(4, 7, dtype=torch.bool)
    expect[torch.arange(4), torch.tensor([3, 0, 5, 1])] = True
    assert torch.equal(sink_mask(p), expect)


def test_answers_forms(planted, smol_tok):
    vocab = planted.tokenizer.get_vocab()
    p = PromptSet.from_text(planted, PLANTED_TEXTS[:2], answers="erin", wrong=["bob", 7])
    assert p.answers.tolist() == [vocab["erin"]] * 2 and p.wrong.tolist() == [vocab["bob"], 7]
    q = PromptSet.from_text(planted, PLANTED_TEXTS[:2], answers=torch.tensor([3, 4]), wrong=5)
    assert q.answers.tolist() == [3, 4] and q.wrong.tolist() == [5, 5]
    one = PromptSet.from_text(smol_tok, "When Mary and John met, John gave a pen to",
                              answers=" Mary", wrong=" John")
    assert one.tokens.shape[0] == 1 and one.attention_mask is None
    assert one.answers.tolist() == smol_tok(" Mary", add_special_tokens=False)["input_ids"]


def test_padding_side_property():
    toks = torch.ones(2, 3, dtype=torch.long)
    assert PromptSet(tokens=toks).padding_side is None
    assert PromptSet(tokens=toks, attention_mask=torch.ones(2, 3)).padding_side is None
    assert PromptSet(tokens=toks, attention_mask=[[0, 1, 1], [1, 1, 1]]).padding_side == "left"
    assert PromptSet(tokens=toks, attention_mask=[[1, 1, 1], [1, 0, 0]]).padding_side == "right"
    assert PromptSet(tokens=toks, attention_mask=[[0, 1, 1], [1, 1, 0]]).padding_side == "mixed"
    assert PromptSet(tokens=toks, attention_mask=[[1, 0, 1], [1, 1, 1]]).padding_side == "mixed"


class _Slow:
    """A tokenizer without offsets (is_fast False), delegating to a fast one."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text, **kw):
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available")
        return self._tok(text, **kw)

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, k):
        return getattr(self._tok, k)


def test_slow_tokenizer_falls_back_to_token_ids(smol_tok):
    texts = ["When Mary and John went to the store, John gave a drink to", "Amy met John"]
    roles = {"S": ([" John", " John"], -1), "M": ["When", "Amy"]}
    fast = PromptSet.from_text(smol_tok, texts, roles=roles, padding_side="left")
    slow = PromptSet.from_text(_Slow(smol_tok), texts, roles=roles, padding_side="left")
    assert torch.equal(slow.tokens, fast.tokens)
    for k in fast.roles:
        assert torch.equal(slow.roles[k], fast.roles[k]), k
    with pytest.raises(PromptError, match=r"roles\['X'\]: ' Paris' \(as the tokens \[' Paris'\]\)"
                                          r" is not in prompt 0"):
        PromptSet.from_text(_Slow(smol_tok), texts, roles={"X": " Paris"})


def _err(match, *args, **kw):
    with pytest.raises(PromptError, match=match):
        PromptSet.from_text(*args, **kw)


IOI = ["When Mary and John went to the store, John gave a drink to",
       "When Tom and Amy met, Amy gave a pen to"]


def test_bad_answers(smol_tok):
    _err(r"answers\[1\]: 'Amy' is 2 tokens \['A', 'my'\]; an answer must be one token\. ' Amy' "
         r"\(with its leading space\) is one token", smol_tok, IOI, answers=[" Mary", "Amy"])
    _err(r"^wrong: 'Maryland xyz' is 4 tokens .*a wrong answer must be one token$", smol_tok,
         IOI, wrong="Maryland xyz")
    _err(r"answers: expected one per prompt \(2\), got 3", smol_tok, IOI, answers=[1, 2, 3])
    _err(r"wrong\[0\]: expected a string or an integer token id, got bool", smol_tok, IOI,
         wrong=[True, 2])
    _err(r"answers: token id -1 is outside the tokenizer's vocabulary", smol_tok, IOI, answers=-1)


def test_bad_roles(smol_tok):
    _err(r"roles\['IO'\]: ' Mary' is not in prompt 1 \('When Tom and Amy met, Amy gave a pen to'"
         r"\)", smol_tok, IOI, roles={"IO": " Mary"})
    _err(r"roles\['S'\]: ' John' occurs 2 times in prompt 0 .* at token positions \[4, 10\]; pass "
         r"\(' John', 0\) for the first or \(' John', -1\) for the last", smol_tok, IOI,
         roles={"S": [" John", " Amy"]})
    _err(r"roles\['S'\]: 'Joh' in prompt 0 starts inside the token ' John' and ends inside the "
         r"token ' John'; the text there is the tokens \[' John'\]", smol_tok, IOI,
         roles={"S": ("Joh", 0)})
    _err(r"roles\['S'\]: occurrence 2 of ' John' asked, but prompt 0 has 2", smol_tok, IOI,
         roles={"S": ([" John", " Amy"], 2)})
    _err(r"roles\['X'\]: position 15 is outside prompt 0 \(15 tokens", smol_tok, IOI,
         roles={"X": 15})
    _err(r"roles\['X'\]: expected one per prompt \(2\), got 1", smol_tok, IOI, roles={"X": [3]})
    _err(r"roles\['X'\]: expected a substring .* got 3\.5", smol_tok, IOI, roles={"X": 3.5})
    _err(r"roles: expected a dict", smol_tok, IOI, roles=[("X", 1)])


def test_bad_lengths_counts_and_options(smol_tok, planted):
    long = IOI[0].replace("John went", "Johnathan went")
    _err(r"corrupted\[0\]: 'When Mary and Johnathan .* is 16 tokens but its clean prompt "
         r"clean\[0\] .* is 15; a corrupted prompt must have as many tokens as its clean prompt "
         r"so that positions \(roles\) line up\. clean: \[.*\]; corrupted: \[.*'athan'",
         smol_tok, IOI, [long, IOI[1]])
    _err(r"corrupted: expected 2 strings \(one per clean prompt\), got 1", smol_tok, IOI, ["x"])
    _err(r"clean: expected at least one prompt", smol_tok, [])
    _err(r"clean: expected a string or a sequence of strings, got int", smol_tok, 3)
    _err(r"padding_side: expected 'left' or 'right', got 'middle'", smol_tok, IOI,
         padding_side="middle")
    _err(r"prepend_bos: expected True, False or None, got 'yes'", smol_tok, IOI,
         prepend_bos="yes")
    _err(r"model: expected a TransformerBridge with a tokenizer or a Hugging Face tokenizer, "
         r"got object$", object(), IOI)
    planted_no_tok = type("Bridge", (), {"tokenizer": None, "cfg": planted.cfg})()
    _err(r"got Bridge whose tokenizer is None", planted_no_tok, IOI)


def test_no_bos_token():
    core = Tokenizer(models.WordLevel(vocab={"<pad>": 0, "a": 1, "b": 2}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<pad>")
    _err(r"prepend_bos: the tokenizer has no BOS token to prepend; pass prepend_bos=False", tok,
         ["a b"])
    p = PromptSet.from_text(tok, ["a b", "b"], prepend_bos=False, padding_side="left",
                            roles={"B": "b"})
    assert p.tokens.tolist() == [[1, 2], [0, 2]]
    assert p.roles["B"].tolist() == [1, 1] and "BOS" not in p.roles
    assert p.attention_mask.tolist() == [[1, 1], [0, 1]]


def test_audit_from_text_equals_tensors(planted):
    tok = planted.tokenizer
    ref = lensattr.tasks.get("planted-copy").prompts(12)
    corrupted = [tok.decode(row[1:]) for row in ref.corrupted.tolist()]
    s1 = [tok.decode([i]) for i in ref.tokens[:, 1].tolist()]
    p = PromptSet.from_text(planted, list(ref.text), corrupted,
                            answers=[tok.decode([a]) for a in ref.answers.tolist()],
                            wrong=ref.wrong, roles={"S1": (s1, 0), "DECOY": 3, "S2": -3},
                            name="planted-copy")
    assert torch.equal(p.tokens, ref.tokens) and torch.equal(p.corrupted, ref.corrupted)
    assert {k: v.tolist() for k, v in p.roles.items()} == {
        k: v.tolist() for k, v in ref.roles.items()}
    tensors = PromptSet(tokens=ref.tokens, corrupted=ref.corrupted, answers=ref.answers,
                        wrong=ref.wrong, roles=ref.roles, name="planted-copy")
    a = lensattr.audit(planted, p, lensattr.LogitDiff(), progress=False)
    b = lensattr.audit(planted, tensors, lensattr.LogitDiff(), progress=False)
    pd.testing.assert_frame_equal(a.heads, b.heads)
    assert (a.heads["verdict"] != "undetermined").any()  # a table with findings
    assert a.meta["padding_side"] is None


def test_meta_records_padding_side(planted):
    ref = lensattr.tasks.get("planted-copy").prompts(6)
    texts = [t + (" ?" if i % 2 else "") for i, t in enumerate(ref.text)]
    p = PromptSet.from_text(planted, texts, answers=ref.answers, wrong=ref.wrong,
                            padding_side="left")
    assert p.padding_side == "left"
    a = lensattr.audit(planted, p, lensattr.LogitDiff(), progress=False, heads=[(0, 0)])
    assert a.meta["padding_side"] == "left"
    assert a.meta["sink_roles"] == ["BOS"]
