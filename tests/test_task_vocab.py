"""A task's token ids are for one vocabulary: a model with another one is refused."""

import pytest
import torch

import lensattr
from lensattr.core.metrics import LogitDiff
from lensattr.core.prompts import PromptError, PromptSet, VocabFingerprint, vocab_fingerprint
from lensattr.evidence import Engine

from .conftest import word_tokenizer


@pytest.fixture(scope="module")
def planted():
    return lensattr.load_model("planted")


def test_fingerprint_compares_vocabularies_not_names():
    a = vocab_fingerprint(word_tokenizer(50), "a")
    b = vocab_fingerprint(word_tokenizer(50), "b")
    c = vocab_fingerprint(word_tokenizer(51), "a")
    assert a == b and a != c and isinstance(a, VocabFingerprint)
    assert "'a' (50 tokens" in str(a)


def test_task_prompts_refuse_a_model_with_another_vocabulary(random_gpt2, planted):
    task = lensattr.tasks.get("planted-copy")
    with pytest.raises(PromptError, match=r"'planted-copy' .*vocabulary of 'planted' "
                                          r"\(17 tokens.*model 'random-gpt2' has another"):
        task.prompts(4, model=random_gpt2)
    p = task.prompts(4, model=planted)  # its own model: fine
    assert p.vocab == vocab_fingerprint(planted.tokenizer)


def test_engine_refuses_prompts_for_another_vocabulary(random_gpt2, planted):
    """The planted-copy ids all lie inside random-gpt2's 50 tokens, so the vocabulary-size
    check alone lets them through: the fingerprint does not."""
    p = lensattr.tasks.get("planted-copy").prompts(4)
    with pytest.raises(PromptError, match="model 'random-gpt2' has another vocabulary"):
        Engine(random_gpt2, p, LogitDiff(), progress=False)
    with pytest.raises(PromptError, match="model 'random-gpt2' has another vocabulary"):
        lensattr.audit(random_gpt2, "planted-copy", progress=False)


def test_prompts_without_a_recorded_vocabulary_are_not_checked(random_gpt2, random_prompts):
    assert random_prompts.vocab is None
    Engine(random_gpt2, random_prompts, LogitDiff(), progress=False)


def test_prompts_record_a_tokenizer_given_as_vocab(random_gpt2):
    p = PromptSet(tokens=torch.ones(2, 3, dtype=torch.long), answers=[1, 2], wrong=[3, 4],
                  vocab=random_gpt2.tokenizer)
    assert p.vocab == vocab_fingerprint(random_gpt2.tokenizer)
    assert p.take(torch.tensor([0])).vocab == p.vocab
    Engine(random_gpt2, p, LogitDiff(), progress=False)
    p.validate_tokenizer(word_tokenizer(50))
    with pytest.raises(PromptError, match="has no tokenizer to check it against"):
        p.validate_tokenizer(None, "bare")


def test_character_tasks_are_built_through_the_models_tokenizer(planted):
    """The character tasks take their ids from the model's tokenizer and record it; a model
    without enough single characters gets a clear error instead of an obscure one."""
    with pytest.raises(PromptError, match="need 41 single-character tokens.*'planted' has 1"):
        lensattr.tasks.get("induction").prompts(2, model=planted)
