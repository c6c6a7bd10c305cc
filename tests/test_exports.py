"""The top-level namespace is curated: ``__all__`` names exactly the public objects
``lensattr`` defines at the top, each resolves, and the claim functions a notebook reaches for
take a PromptSet as well as token ids."""

from __future__ import annotations

import inspect

import pytest
import torch

import lensattr


def test_all_is_exactly_the_public_top_level():
    public = {n for n, v in vars(lensattr).items()
              if not n.startswith("_") and not inspect.ismodule(v)}
    listed = set(lensattr.__all__) - {"tasks", "__version__"}  # the task registry is a module
    assert len(lensattr.__all__) == len(set(lensattr.__all__)), "a name listed twice"
    assert public == listed, (f"defined but not in __all__: {sorted(public - listed)}; "
                              f"in __all__ but not defined: {sorted(listed - public)}")
    assert inspect.ismodule(lensattr.tasks)


@pytest.mark.parametrize("name", ["rollout", "flow", "norm_attention",
                                  "direct_logit_attribution", "source_dla", "Verdict",
                                  "EvidenceKey", "audit", "PromptSet", "atp",
                                  "activation_patching", "path_patching"])
def test_notebook_names_at_the_top(name):
    assert name in lensattr.__all__ and getattr(lensattr, name) is not None


@pytest.fixture(scope="module")
def planted():
    model = lensattr.load_model("planted")
    return model, lensattr.tasks.get("planted-copy").prompts(4, 0, model)


@pytest.mark.parametrize("fn", ["rollout", "flow", "norm_attention"])
def test_claim_functions_take_a_prompt_set(planted, fn):
    model, p = planted
    f = getattr(lensattr, fn)
    a, b = f(model, p), f(model, p.tokens, p.attention_mask)
    tensors = {k: v for k, v in vars(a).items() if isinstance(v, torch.Tensor)}
    assert tensors, f"{fn} returned no tensors to compare"
    for k, v in tensors.items():
        torch.testing.assert_close(v, getattr(b, k), rtol=0, atol=0, equal_nan=True,
                                   msg=f"{fn}: {k} differs between PromptSet and ids")
    with pytest.raises(ValueError, match="attention_mask: given beside a PromptSet"):
        f(model, p, torch.ones_like(p.tokens))
