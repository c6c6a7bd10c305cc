"""The fused tanh-GELU MLP of the hook-free forwards equals HF's Python one and leaves the
model's module untouched."""

import torch
from transformers import GPT2Config
from transformers.activations import FastGELUActivation, NewGELUActivation
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from lensattr.models.fused import TanhGELU, fused_mlp


def test_fused_mlp_equals_hf_and_shares_weights():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=16, activation_function="gelu_new")
    mlp = GPT2MLP(64, cfg).eval()
    assert isinstance(mlp.act, NewGELUActivation)
    fast = fused_mlp(mlp)
    assert fast is not mlp and isinstance(fast.act, TanhGELU)
    assert isinstance(mlp.act, NewGELUActivation)  # the model's own module is unchanged
    assert fast.c_fc is mlp.c_fc and fast.c_proj is mlp.c_proj  # weights shared
    x = torch.randn(5, 7, 16) * 3
    assert torch.allclose(fast(x), mlp(x), atol=1e-5)
    assert not torch.equal(fast(x), torch.zeros_like(x))


def test_fused_gelu_equals_python_gelus():
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    for slow in (NewGELUActivation(), FastGELUActivation()):
        assert (TanhGELU()(x) - slow(x)).abs().max() < 1e-9


def test_other_activations_are_left_alone():
    cfg = GPT2Config(n_embd=16, activation_function="relu")
    mlp = GPT2MLP(64, cfg)
    assert fused_mlp(mlp) is mlp
