"""What the claim functions accept as prompts: token ids with an optional mask, or a
:class:`~lensattr.core.prompts.PromptSet` (which carries its own mask)."""

from __future__ import annotations

from torch import Tensor

from ..core.prompts import PromptSet

__all__ = ["token_inputs"]


def token_inputs(tokens: Tensor | PromptSet, attention_mask: Tensor | None
                 ) -> tuple[Tensor, Tensor | None]:
    """``(tokens, attention_mask)`` of either form; a PromptSet's own mask is used, and a
    second mask beside it is refused (the two could disagree)."""
    if isinstance(tokens, PromptSet):
        if attention_mask is not None:
            raise ValueError("attention_mask: given beside a PromptSet, which carries its own "
                             "mask; pass the PromptSet alone, or token ids with a mask")
        return tokens.tokens, tokens.attention_mask
    return tokens, attention_mask
