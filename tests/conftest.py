"""Shared fixtures: tiny models built offline."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lensattr.core.prompts import PromptSet
from lensattr.models.loading import boot_bridge
from lensattr.models.zoo.word_vocab import word_tokenizer as _words


def word_tokenizer(n_vocab: int):
    return _words(["<bos>"] + [f"w{i}" for i in range(1, n_vocab)], "test-words")


def sharp_gpt2(name: str, seed: int = 0, tie_word_embeddings: bool = False, n_layer: int = 2):
    """A random 2-layer (``n_layer``), 4-head GPT-2 (50 words) with large weights (initializer
    range 0.3): sharp attention that moves between prompts, so patches move the metric well
    above rounding."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=n_layer, n_head=4,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie_word_embeddings,
                     initializer_range=0.3)
    return boot_bridge(GPT2LMHeadModel(cfg), word_tokenizer(50), name)


@pytest.fixture(scope="session")
def random_gpt2():
    """A randomly initialised 2-layer, 4-head GPT-2 with a 50-token vocabulary."""
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=50,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    return boot_bridge(GPT2LMHeadModel(cfg), word_tokenizer(50), "random-gpt2")


@pytest.fixture(scope="session")
def random_prompts():
    from lensattr.core.prompts import PromptSet

    g = torch.Generator().manual_seed(1)
    toks = torch.randint(1, 50, (6, 9), generator=g)
    toks[:, 0] = 0
    corr = toks.clone()
    corr[:, 2] = torch.randint(1, 50, (6,), generator=g)
    ans = torch.randint(1, 50, (6,), generator=g)
    wrong = torch.randint(1, 50, (6,), generator=g)
    return PromptSet(tokens=toks, corrupted=corr, answers=ans, wrong=wrong, roles={"S": 2})


def left_padded_prompts(n: int = 6, p: int = 9, pads=(0, 1, 2, 3, 0, 2), seed: int = 1,
                        n_vocab: int = 50, corrupted: bool = True) -> PromptSet:
    """Left-padded prompts: prompt i starts with ``pads[i]`` padding positions (mask 0, random
    non-BOS token ids there, so unmasked padding would change the numbers), then BOS (id 0) and
    random words. Roles ``S`` (the corrupted position) and ``TOK`` sit 2 and 3 after the BOS, so
    they move with the padding (the prompts are not aligned); ``END`` is the last position."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.tensor(pads[:n], dtype=torch.long)
    toks = torch.randint(1, n_vocab, (n, p), generator=g)
    mask = (torch.arange(p)[None] >= pad[:, None]).long()  # [batch, pos]: 0 before the BOS
    rows = torch.arange(n)
    toks[rows, pad] = 0
    s = pad + 2
    corr = toks.clone()
    shift = torch.randint(1, n_vocab - 1, (n,), generator=g)  # a different word at S
    corr[rows, s] = (toks[rows, s] - 1 + shift) % (n_vocab - 1) + 1
    return PromptSet(tokens=toks, attention_mask=mask, corrupted=corr if corrupted else None,
                     answers=torch.randint(1, n_vocab, (n,), generator=g),
                     wrong=torch.randint(1, n_vocab, (n,), generator=g),
                     roles={"S": s, "TOK": s + 1})
