"""The trained zoo models: loadable offline, and their recorded circuit facts still hold.

Re-measuring uses the same weights, inputs and code as ``experiments/train_zoo.py``, so the
numbers agree to float rounding; the tolerances below (1e-3 absolute, scores in [0, 1] and
losses in nats) only absorb BLAS/thread-count differences between machines.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lensattr.evidence.facts import measure_facts
from lensattr.models.loading import boot_bridge, list_models
from lensattr.models.zoo import trained

FOLDERS = sorted(p.parent for p in trained.WEIGHTS.glob("*/facts.json"))
NAMES = [f.name for f in FOLDERS]
TOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one thread is faster (and steadier on a shared CPU) than several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_models_are_shipped_and_registered():
    assert {"attn2", "gpt3l"} <= set(NAMES)
    assert set(NAMES) <= {m.name for m in list_models()}


@pytest.fixture(scope="module", params=NAMES)
def shipped(request) -> dict:
    """One booted bridge per model (through the registered builder) and its re-measured facts."""
    name = request.param
    folder = trained.WEIGHTS / name
    info = {m.name: m for m in list_models()}[name]
    hf, tok = info.builder()
    bridge = boot_bridge(hf, tok, name)
    recipe = json.loads((folder / "recipe.json").read_text())
    return {
        "name": name,
        "folder": folder,
        "bridge": bridge,
        "tok": tok,
        "recipe": recipe,
        "facts": json.loads((folder / "facts.json").read_text()),
        "measured": measure_facts(bridge, tok, trained.heldout_text(recipe)),
    }


def test_registration(shipped):
    info = {m.name: m for m in list_models()}[shipped["name"]]
    assert "induction" in info.contains and "train_zoo.py" in info.recipe
    assert "params" in info.size


def test_files(shipped):
    folder = shipped["folder"]
    weights = folder / "model.safetensors"
    assert weights.stat().st_size < 3_000_000
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "recipe.json"):
        assert (folder / f).exists(), f


def test_char_tokenizer(shipped):
    tok = shipped["tok"]
    ids = tok("ab c")["input_ids"]
    assert len(ids) == 4 and tok.decode(ids) == "ab c"
    assert tok.bos_token_id == 0 and len(tok) < 110
    text = "def f(x):\n    return {'a': x}  # ok"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("\u00e9")["input_ids"] == [tok.unk_token_id]  # rare characters map to <unk>


def test_facts_reproduce(shipped):
    old, new = shipped["facts"], shipped["measured"]
    for key in ("induction_score", "prev_token_score"):
        assert torch.allclose(torch.tensor(new[key]), torch.tensor(old[key]), atol=TOL), key
    for key in ("loss_first_half", "loss_second_half"):
        assert new[key] == pytest.approx(old[key], abs=TOL), key
    for kind in ("top_induction", "top_prev_token", "all_induction"):
        got, want = new[f"ablate_{kind}"], old[f"ablate_{kind}"]
        assert got["heads"] == want["heads"], kind
        assert got["increase"] == pytest.approx(want["increase"], abs=TOL), kind
    if "heldout_loss" not in new:
        pytest.skip("this Python's stdlib differs from the recorded held-out files")
    assert new["heldout_loss"] == pytest.approx(old["heldout_loss"], abs=TOL)


def test_circuit_thresholds(shipped):
    f = shipped["measured"]
    assert f["top_induction_score"] > 0.3
    assert f["top_prev_token_score"] > 0.5
    assert f["top_induction_head"][0] > f["top_prev_token_head"][0]  # composition needs depth
    assert f["loss_second_half"] < 0.25 * f["loss_first_half"]
    # Several induction heads back each other up, so zeroing the top one costs less than
    # zeroing them all; both must clearly raise the repeated-half loss.
    top, every = f["ablate_top_induction"], f["ablate_all_induction"]
    assert top["loss_second_half"] > 2 * f["loss_second_half"] and top["increase"] > 0.1
    assert every["increase"] > 1.0
    assert f["ablate_top_prev_token"]["increase"] > 0.5
    assert shipped["facts"]["heldout_loss"] < 2.5  # the held-out text's unigram entropy is 3.13
    curve = shipped["facts"]["loss_curve"]
    assert curve[-1]["heldout"] < curve[0]["heldout"] - 0.5


def test_attn_only_mlps_are_exactly_zero():
    folder = trained.WEIGHTS / "attn2"
    state = load_file(str(folder / "model.safetensors"))
    mlp = [k for k in state if ".mlp." in k]
    assert len(mlp) == 8  # 2 layers x (c_fc, c_proj) x (weight, bias)
    assert all(torch.count_nonzero(state[k]) == 0 for k in mlp)
    assert all(torch.count_nonzero(state[k]) > 0 for k in state if ".attn." in k)
    hf, _ = trained.load(folder)
    assert all(torch.count_nonzero(p) == 0 for b in hf.transformer.h for p in b.mlp.parameters())


def test_bridge_logits_equal_hf(shipped):
    hf, tok = trained.load(shipped["folder"])  # a fresh copy, untouched by the bridge
    win = trained.text_windows(tok, "def main():\n    return sorted(x for x in range(10))\n", 4, 40)
    for tokens in (trained.repeated_tokens(tok, n_seq=4), win):
        with torch.no_grad():
            want = hf(tokens).logits
            got = shipped["bridge"](tokens)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
