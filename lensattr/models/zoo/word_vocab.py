"""An in-memory word-level tokenizer that boots a TransformerBridge offline."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["word_tokenizer"]


def word_tokenizer(words: Sequence[str], name: str) -> PreTrainedTokenizerFast:
    """Whitespace-split WordLevel tokenizer over ``words`` (id = index); ``words[0]`` is the
    BOS token and also serves as EOS, padding and unknown. ``init_kwargs`` are set so that
    TransformerLens neither fails on ``name_or_path`` nor falls back to the hub."""
    bos = words[0]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=bos))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=bos, pad_token=bos, unk_token=bos
    )
    tok.init_kwargs["name_or_path"] = name
    tok.init_kwargs["add_bos_token"] = True
    return tok
