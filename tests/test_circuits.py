"""Weight-based claims: composition scores equal the formula on dense matrices, copying
scores equal the eigenvalues of the dense full OV circuit (GPT-2 and Llama-GQA)."""

import pytest
import torch

from lensattr.claims.circuits import composition_scores, copying_scores, head_circuits
from lensattr.models.adapter import Adapter

from .test_architectures import build


def _dense(model):
    a = Adapter(model)
    W_Q = model.W_Q.detach().double()  # [L, H, d, dh]
    rep = a.n_heads // a.n_kv_heads
    W_K = model.W_K.detach().double().repeat_interleave(rep, 1)
    W_V = model.W_V.detach().double().repeat_interleave(rep, 1)
    W_O = model.W_O.detach().double()
    return W_Q @ W_K.transpose(-1, -2), W_V @ W_O  # QK, OV [L, H, d, d]


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def model(request, random_gpt2):
    return random_gpt2 if request.param == "gpt2" else build(request.param)


def test_composition_scores_equal_formula(model):
    QK, OV = _dense(model)
    got = composition_scores(model)
    n_l, n_h = QK.shape[:2]
    for l1 in range(n_l):
        for h1 in range(n_h):
            for l2 in range(n_l):
                for h2 in range(n_h):
                    for mode, right in (("Q", QK[l2, h2]), ("K", QK[l2, h2].T),
                                        ("V", OV[l2, h2])):
                        val = got.scores[mode][l1, h1, l2, h2]
                        if l1 >= l2:
                            assert torch.isnan(val)
                            continue
                        left = OV[l1, h1]
                        ref = (left @ right).norm() / left.norm() / right.norm()
                        assert abs(val.item() - ref.item()) < 1e-5
    frame = got.to_frame()
    assert len(frame) == n_h * n_h * n_l * (n_l - 1) // 2
    assert {"q_composition", "k_composition", "v_composition"} <= set(frame.columns)


def test_circuits_and_copying_scores(model):
    QK, OV = _dense(model)
    c = head_circuits(model)
    torch.testing.assert_close(c.ov_norm.double(), OV.norm(dim=(-1, -2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.qk_norm.double(), QK.norm(dim=(-1, -2)), rtol=1e-5, atol=1e-5)
    W_E, W_U = model.W_E.detach().double(), model.W_U.detach().double()
    got = copying_scores(model)
    for li in range(OV.shape[0]):
        for h in range(OV.shape[1]):
            ev = torch.linalg.eigvals(W_E @ OV[li, h] @ W_U)  # [d_vocab]; rank <= d_head
            ref = ev.sum().real / ev.abs().sum()
            assert abs(got[li, h].item() - ref.item()) < 1e-3
    assert got.shape == OV.shape[:2] and (got.abs() <= 1 + 1e-6).all()
