"""load_model: hub ids (with dots) reach the hub; missing local paths fail at once; in-memory
HF models load with their tokenizer; no error message prints a whole module."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lensattr
from lensattr.models.adapter import ModelError
from lensattr.models.loading import is_hub_id
from lensattr.models.state import loaded_name

from .conftest import word_tokenizer


@pytest.fixture
def hub_calls(monkeypatch):
    """Record calls to the hub path instead of downloading."""
    from types import SimpleNamespace

    from transformer_lens import TransformerBridge

    calls = []

    def fake(name, **kw):
        calls.append(name)
        return SimpleNamespace()

    monkeypatch.setattr(TransformerBridge, "boot_transformers", fake)
    return calls


@pytest.mark.parametrize("name", ["EleutherAI/pythia-1.4b", "HuggingFaceTB/SmolLM2-135M",
                                  "gpt2", "openai-community/gpt2"])
def test_hub_ids_reach_the_hub(hub_calls, name):
    bridge = lensattr.load_model(name)
    assert hub_calls == [name] and loaded_name(bridge) == name


@pytest.mark.parametrize("name", ["./nope", "models/mine", "mine.gguf", "a/b/c", "~/nope-xyz",
                                  "/no/such/folder", "org/weights.safetensors", "sub\\dir"])
def test_missing_paths_fail_at_once(hub_calls, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # so models/mine is a path under an existing folder
    with pytest.raises(ModelError, match="name_or_path: no such file or folder"):
        lensattr.load_model(name)
    assert hub_calls == []  # the hub was never tried


def test_missing_gguf_is_named(hub_calls):
    with pytest.raises(ModelError, match="no such file or folder 'mine.gguf' .*GGUF file"):
        lensattr.load_model("mine.gguf")
    assert hub_calls == []


def test_is_hub_id():
    assert is_hub_id("EleutherAI/pythia-1.4b") and is_hub_id("gpt2")
    assert not is_hub_id("../x") and not is_hub_id("x y") and not is_hub_id("a/b/c")


def _hf():
    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def test_in_memory_hf_model_with_its_tokenizer(random_prompts):
    hf = _hf()
    bridge = lensattr.load_model(hf, tokenizer=word_tokenizer(50), name="mine")
    with torch.no_grad():
        ref = hf(random_prompts.tokens).logits
    torch.testing.assert_close(bridge(random_prompts.tokens), ref, atol=1e-4, rtol=0)
    assert lensattr.Adapter(bridge).name == "mine"
    assert lensattr.load_model(bridge) is bridge  # already a bridge: returned as is


def test_in_memory_needs_a_tokenizer():
    with pytest.raises(ModelError, match=r"tokenizer: required with an in-memory model "
                                         r"\(GPT2LMHeadModel\)"):
        lensattr.load_model(_hf())
    with pytest.raises(ModelError, match="tokenizer: expected a Hugging Face tokenizer, got dict"):
        lensattr.load_model(_hf(), tokenizer={})
    with pytest.raises(ModelError, match="tokenizer: only used with an in-memory model"):
        lensattr.load_model("planted", tokenizer=word_tokenizer(50))


def test_no_error_message_prints_a_module(random_gpt2, random_prompts):
    module = torch.nn.Linear(2, 2)
    for call in (
        lambda: lensattr.load_model(module),
        lambda: lensattr.load_model(module, tokenizer=word_tokenizer(50)),
        lambda: lensattr.Adapter(module),
        lambda: lensattr.audit(module, random_prompts, lensattr.LogitDiff()),
        lambda: lensattr.audit(random_gpt2, random_prompts, lensattr.LogitDiff(),
                               heads=module, progress=False),
    ):
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert "Linear" in msg and "in_features" not in msg, msg
    with pytest.raises(ModelError) as info:  # a whole HF model: its repr is pages long
        lensattr.load_model(_hf())
    assert "GPT2LMHeadModel" in str(info.value) and "(transformer)" not in str(info.value)
