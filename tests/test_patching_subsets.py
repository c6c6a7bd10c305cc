"""Patching a subset: activation patching of chosen heads (``heads=``) and path patching to
chosen receivers (``receiver_heads=``). The chosen cells equal the full run's, the others are
not computed (NaN), and bad head lists are refused naming the argument."""

import pytest
import torch

from lensattr.core.metrics import LogitDiff
from lensattr.evidence.patching import activation_patching, path_patching

from .conftest import sharp_gpt2
from .test_architectures import build
from .test_architectures import prompts as _prompts


@pytest.fixture(scope="module")
def models():
    return {"gpt2": sharp_gpt2("recv-gpt2", n_layer=3), "llama": build("llama-gqa")}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chosen_receivers_equal_the_full_run(models, family):
    model, p = models[family], _prompts(n=4, p=6)
    full = path_patching(model, p, LogitDiff(), (0, 1))
    sub = path_patching(model, p, LogitDiff(), (0, 1), receiver_heads=[(1, 3)])
    assert sub.meta["receiver_heads"] == [(1, 3)]
    for c, comp in enumerate(sub.components):
        # q: query head 3; k/v: the key/value head query head 3 reads (1 of 2 under GQA)
        h = 3 if comp == "q" or family == "gpt2" else 1
        torch.testing.assert_close(sub.values[c, 1, h], full.values[c, 1, h], atol=0, rtol=0)
        torch.testing.assert_close(sub.pattern_change[c, 1, h], full.pattern_change[c, 1, h],
                                   atol=0, rtol=0)
        others = torch.ones(sub.values.shape[1:3], dtype=torch.bool)
        others[1, h] = False
        assert torch.isnan(sub.values[c][others]).all(), f"{comp}: unchosen cells computed"
        assert not torch.isnan(full.values[c][others][4:]).all()  # the full run has them
    torch.testing.assert_close(sub.logits, full.logits, atol=0, rtol=0)
    assert (full.values[0, 1, 3] - full.base).abs().max() > 1e-3  # the cell moves the metric


def test_one_receiver_as_a_pair_and_bad_receivers(models):
    model, p = models["gpt2"], _prompts(n=4, p=6)
    one = path_patching(model, p, LogitDiff(), (0, 1), receivers=("q",), receiver_heads=(2, 0))
    assert one.meta["receiver_heads"] == [(2, 0)]
    assert torch.isnan(one.values[0, 1]).all() and not torch.isnan(one.values[0, 2, 0]).any()
    for bad, match in (([(0, 2)], r"receiver_heads: \[\(0, 2\)\] are not after the sender"),
                       ([(1, 9)], "receiver_heads: head 9 out of range"),
                       ([], "receiver_heads: empty"),
                       (["L1H2"], "receiver_heads: expected HeadId")):
        with pytest.raises(ValueError, match=match):
            path_patching(model, p, LogitDiff(), (0, 1), receiver_heads=bad)


@pytest.mark.parametrize("family,site,by", [("gpt2", "z", "all"), ("gpt2", "z", "pos"),
                                            ("llama", "k", "all"), ("llama", "q", "pos")])
def test_chosen_heads_equal_the_full_sweep(models, family, site, by):
    model, p = models[family], _prompts(n=4, p=6)
    full = activation_patching(model, p, LogitDiff(), site=site, by=by)
    sub = activation_patching(model, p, LogitDiff(), site=site, by=by, heads=[(1, 3), (0, 0)])
    assert sub.meta["heads"] == [(0, 0), (1, 3)]
    head_axis = sub.axes.index("head")
    kv = 1 if (family == "llama" and site in ("k", "v")) else 3  # GQA: query head 3 reads kv 1
    chosen = torch.zeros(sub.values.shape[:-1], dtype=torch.bool)
    for layer, h in ((0, 0), (1, kv)):
        chosen[(layer,) + (slice(None),) * (head_axis - 1) + (h,)] = True
    torch.testing.assert_close(sub.values[chosen], full.values[chosen], atol=0, rtol=0)
    assert torch.isnan(sub.values[~chosen]).all()
    assert not torch.isnan(full.values[~chosen]).any()
    assert (full.values[chosen] - full.base).abs().max() > 1e-3  # the chosen cells move it
    frame = sub.to_frame()
    assert len(frame) == len(full.to_frame())
    with pytest.raises(ValueError, match="heads: layer 7 out of range"):
        activation_patching(model, p, LogitDiff(), site=site, by=by, heads=[(7, 0)])
    with pytest.raises(ValueError, match="heads: expected a list of"):
        activation_patching(model, p, LogitDiff(), site=site, by=by, heads=5)
