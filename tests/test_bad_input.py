"""Bad input gets a clear error naming the argument."""

import pytest
import torch

import lensattr
from lensattr.core.metric import MetricError
from lensattr.core.metrics import LogitDiff, LogitsMetric
from lensattr.core.prompts import PromptError, PromptSet
from lensattr.core.sites import Site
from lensattr.evidence import Engine, ablate, remove_sources
from lensattr.models.adapter import Adapter, ModelError


def test_head_out_of_range(random_gpt2, random_prompts):
    a = Adapter(random_gpt2)
    with pytest.raises(ValueError, match=r"head: layer 5 out of range.*0\.\.1"):
        a.check_head((5, 0))
    with pytest.raises(ValueError, match=r"head: head 9 out of range.*0\.\.3"):
        a.check_head((0, 9))
    e = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False)
    with pytest.raises(ValueError, match="head: layer 2 out of range"):
        e.run([ablate((2, 0))])


def test_unequal_unpadded_prompts():
    with pytest.raises(PromptError, match="tokens: prompts of unequal length.*attention_mask"):
        PromptSet.from_lists([[0, 1, 2], [0, 1]])


def test_corrupted_shape():
    with pytest.raises(PromptError, match=r"corrupted: expected the same shape .*\(2, 3\)"):
        PromptSet(
            tokens=torch.zeros(2, 3, dtype=torch.long),
            corrupted=torch.zeros(2, 4, dtype=torch.long),
        )


def test_empty_prompt_set():
    with pytest.raises(PromptError, match="tokens: empty prompt set"):
        PromptSet(tokens=torch.zeros(0, 5, dtype=torch.long))


def test_answers_outside_vocab(random_gpt2):
    p = PromptSet(tokens=torch.zeros(2, 3, dtype=torch.long), answers=[1, 99], wrong=[2, 3])
    with pytest.raises(PromptError, match=r"answers: token id 99 is outside .* 0\.\.49"):
        Engine(random_gpt2, p, LogitDiff(), progress=False)


def test_answers_count():
    with pytest.raises(PromptError, match=r"answers: expected one token id per prompt \(2\)"):
        PromptSet(tokens=torch.zeros(2, 3, dtype=torch.long), answers=[1])


def test_float_tokens():
    with pytest.raises(PromptError, match="tokens: expected integer token ids"):
        PromptSet(tokens=torch.zeros(2, 3))


def test_metric_wrong_shape(random_gpt2, random_prompts):
    bad = LogitsMetric(lambda logits, prompts: logits[:, -1, :2], name="bad")
    with pytest.raises(
        MetricError, match=r"metric 'bad': returned shape \(6, 2\), expected \(6,\)"
    ):
        Engine(random_gpt2, random_prompts, bad, progress=False)


def test_metric_needs_answers(random_gpt2):
    p = PromptSet(tokens=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(MetricError, match="answers and wrong answers"):
        Engine(random_gpt2, p, LogitDiff(), progress=False)


def test_nan_in_logits(random_gpt2, random_prompts):
    a = Adapter(random_gpt2)
    with pytest.raises(MetricError, match="NaN or inf in the logits"):
        e = Engine(a, random_prompts, LogitDiff(), progress=False)
        # poison a head's output through a hook-free path: a NaN mean ablation
        e.z_mean[0][:] = float("nan")
        e.run([ablate((0, 0), method="mean")])


def test_edge_mask_shape(random_gpt2, random_prompts):
    e = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False)
    with pytest.raises(ValueError, match=r"remove: expected shape \(6, 9, 9\)"):
        e.run([remove_sources((0, 0), torch.zeros(6, 4, 4, dtype=torch.bool))])


def test_resample_without_corrupted(random_gpt2, random_prompts):
    p = PromptSet(
        tokens=random_prompts.tokens, answers=random_prompts.answers, wrong=random_prompts.wrong
    )
    e = Engine(random_gpt2, p, LogitDiff(), progress=False)
    with pytest.raises(ValueError, match="method: resample ablation needs corrupted prompts"):
        e.run([ablate((0, 0), method="resample")])


def test_model_without_attention_patterns():
    with pytest.raises(ModelError, match="model: expected a transformer_lens TransformerBridge"):
        Adapter(torch.nn.Linear(2, 2))


def test_unknown_model_lists_available(monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # the hub path is tried, and fails fast
    with pytest.raises(ModelError, match="not a bundled model \\(.*planted"):
        lensattr.load_model("no-such-model-anywhere")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="has no \\*.safetensors weights"):
        lensattr.load_model(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelError, match="never unpickles"):
        lensattr.load_model(str(tmp_path))


def test_unknown_task():
    with pytest.raises(KeyError, match="unknown task 'nope'; available: .*planted-copy"):
        lensattr.tasks.get("nope")


def test_bare_promptset_needs_metric(random_gpt2, random_prompts):
    with pytest.raises(ValueError, match="metric: required"):
        lensattr.audit(random_gpt2, random_prompts)


def test_bad_cache(random_gpt2, random_prompts):
    with pytest.raises(ValueError, match="cache: has no attention pattern"):
        lensattr.audit(random_gpt2, random_prompts, LogitDiff(), cache={}, progress=False)


def test_hooks_removed_on_error(random_gpt2, random_prompts):
    a = Adapter(random_gpt2)

    def boom(x):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        a.forward(random_prompts.tokens, hooks={(Site.Z, 0): boom})
    clean = a.forward(random_prompts.tokens)  # no hook left behind
    assert torch.isfinite(clean).all()


def test_local_folder_loads(random_prompts, tmp_path):
    """The real folder path: an HF checkpoint saved as safetensors loads and gives the HF
    model's own logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from .conftest import word_tokenizer

    torch.manual_seed(5)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    word_tokenizer(50).save_pretrained(tmp_path)
    with torch.no_grad():
        ref = hf(random_prompts.tokens).logits
    loaded = lensattr.load_model(str(tmp_path))
    torch.testing.assert_close(loaded(random_prompts.tokens), ref, atol=1e-4, rtol=0)
