"""Rollout against a hand computation; flow against networkx's max flow on the full layered
graph (no pruning), for decoders and encoders; budgets and mismatches are errors."""

import pytest
import torch

from lensattr.claims.flow import FlowBudgetError, attention_flow, flow
from lensattr.claims.rollout import (
    attention_rollout,
    head_averaged,
    layer_matrices,
    mix_residual,
    rollout,
)

from .test_architectures import build

nx = pytest.importorskip("networkx")


def test_rollout_two_layer_toy_by_hand():
    A1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    A2 = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    mixed = mix_residual(torch.stack([A1, A2])[None])  # 0.5 I + 0.5 A
    # by hand: M1 = [[1, 0], [.25, .75]], M2 = [[1, 0], [.1, .9]]
    # M2 @ M1 = [[1, 0], [.1 + .9 * .25, .9 * .75]] = [[1, 0], [.325, .675]]
    r = attention_rollout(mixed)
    torch.testing.assert_close(r.final[0], torch.tensor([[1.0, 0.0], [0.325, 0.675]],
                                                        dtype=torch.float64))
    torch.testing.assert_close(r.joint[0, 0], torch.tensor([[1.0, 0.0], [0.25, 0.75]],
                                                           dtype=torch.float64))
    # residual weight 0.2: M = 0.2 I + 0.8 A; padded position 1 mixes by the identity only
    m = mix_residual(torch.stack([A1, A2])[None], 0.2, torch.tensor([[1, 0]]))
    torch.testing.assert_close(m[0, 1], torch.eye(2, dtype=m.dtype))


def _nx_flow(m: torch.Tensor, s: int, q: int) -> float:
    """Max flow from (0, s) to (L, q) on the full layered graph of m [L, n, n]."""
    L, n, _ = m.shape
    g = nx.DiGraph()
    for li in range(L):
        for qq in range(n):
            for k in range(n):
                if m[li, qq, k] > 0:
                    g.add_edge((li, k), (li + 1, qq), capacity=float(m[li, qq, k]))
    if (0, s) not in g or (L, q) not in g:
        return 0.0
    return nx.maximum_flow_value(g, (0, s), (L, q))


@pytest.mark.parametrize("causal", [True, False])
def test_flow_equals_networkx_on_random_graphs(causal):
    g = torch.Generator().manual_seed(0 if causal else 1)
    for trial in range(6):
        L = 1 + trial % 3
        n = 2 + trial % 4
        A = torch.rand(2, L, n, n, generator=g, dtype=torch.float64)
        A = A * (torch.rand(A.shape, generator=g) > 0.3)  # some zero edges
        if causal:
            A = A.tril()
        A = A + 1e-3 * torch.eye(n, dtype=A.dtype)
        A = A / A.sum(-1, keepdim=True)
        mixed = mix_residual(A, 0.5)
        got = attention_flow(mixed, causal=causal).values
        for b in range(2):
            for q in range(n):
                for s in range(n):
                    if causal and s > q:
                        assert torch.isnan(got[b, q, s])
                        continue
                    ref = _nx_flow(mixed[b], s, q)
                    assert abs(got[b, q, s].item() - ref) <= 1e-6, (trial, b, q, s)


def test_flow_bounds_and_padding():
    """Flow from s to q is at most the rollout's first-layer capacity out of s, and padded
    tokens are NaN; a one-layer graph's flow is its capacity."""
    A = torch.rand(1, 1, 4, 4, dtype=torch.float64).tril()
    A = A / A.sum(-1, keepdim=True)
    mixed = mix_residual(A)
    f = attention_flow(mixed).values[0]
    torch.testing.assert_close(torch.nan_to_num(f), mixed[0, 0].tril())
    mask = torch.tensor([[1, 1, 1, 0]])
    f = attention_flow(mix_residual(A, 0.5, mask), mask).values[0]
    assert torch.isnan(f[3]).all() and torch.isnan(f[:, 3]).all()


def test_flow_budget_and_mismatch_are_errors():
    A = torch.full((1, 2, 6, 6), 1 / 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="causal=False"):
        attention_flow(mix_residual(A), causal=True)
    with pytest.raises(FlowBudgetError, match="memory_budget_mb=0.0001"):
        attention_flow(mix_residual(A), causal=False, memory_budget_mb=1e-4)


@pytest.mark.parametrize("weights", ["half", "norms"])
def test_rollout_and_flow_on_a_model(random_gpt2, weights):
    tokens = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    r = rollout(random_gpt2, tokens, weights=weights)
    torch.testing.assert_close(r.final.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    assert (r.final.triu(1) == 0).all()  # causal
    f = flow(random_gpt2, tokens, weights=weights, queries=torch.tensor([5]).eq(
        torch.arange(6))[None].expand(2, 6))
    assert torch.isfinite(f.values[:, 5]).all() and torch.isnan(f.values[:, :5]).all()
    # each flow is at most the capacity into the output node (a row of A~ sums to 1)
    assert (f.values[:, 5] <= 1 + 1e-9).all() and (f.values[:, 5] > 0).all()


def test_encoder_rollout_flow_and_cache_path():
    """BERT: bidirectional (rollout fills the upper triangle), padding ignored; a TL cache
    gives the same matrices as lensattr's own run."""
    model = build("bert")
    tokens = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    r = rollout(model, tokens, mask)
    assert (r.final[0].triu(1) > 0).any()
    assert (r.final[1, :3, 3:] == 0).all()
    torch.testing.assert_close(r.final[1, :3].sum(-1), torch.ones(3, dtype=torch.float64))
    f = flow(model, tokens, mask)
    assert torch.isfinite(f.values[0]).all() and torch.isnan(f.values[1, 3:]).all()
    assert len(f.to_frame()) == 25 + 9 and len(r.to_frame()) == 2 * 25
    with pytest.raises(ValueError, match="causal=False"):
        attention_flow(r.mixed, mask, causal=True)
    _, cache = model.run_with_cache(tokens[:1])
    torch.testing.assert_close(mix_residual(head_averaged(model, cache)),
                               layer_matrices(model, tokens[:1]))
