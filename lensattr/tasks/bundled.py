"""The task registry: prompts (+ corrupted prompts, answers, roles), a metric, a default model."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.metric import Metric
from ..core.metrics import AnswerLogProb, HiddenCosineToClean, LogitDiff, PairCosine
from ..core.prompts import PromptError, PromptSet, vocab_fingerprint

__all__ = ["Task", "register_task", "get", "list_tasks"]


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    model: str  # the bundled model the task is made for
    mechanism: str  # the expected mechanism, in words
    make_prompts: Callable[[int, int, object], PromptSet]  # (n_prompts, seed, model)
    make_metric: Callable[[], Metric]
    default_n: int = 32

    def prompts(self, n_prompts: int | None = None, seed: int = 0, model=None) -> PromptSet:
        """The task's prompts; tasks whose prompts need the model (e.g. reference embeddings)
        load their default model when ``model`` is None.

        The prompts record the vocabulary their token ids are for (``PromptSet.vocab``): tasks
        with fixed token ids (``planted-copy``, ``minilm-token``) that of their own model,
        tasks built from text or from the tokenizer (the character tasks) that of the model
        they were built through. A ``model`` whose tokenizer has another vocabulary is refused,
        naming both and the tasks made for that model."""
        try:
            n = self.default_n if n_prompts is None else operator.index(n_prompts)
        except TypeError:
            raise ValueError(f"n_prompts: expected an integer, got {n_prompts!r}") from None
        if n < 1:
            raise ValueError(f"n_prompts: expected at least 1, got {n}")
        prompts = self.make_prompts(n, seed, model)
        if model is not None:
            bridge, name = _bridge_and_name(model)
            try:
                prompts.validate_tokenizer(getattr(bridge, "tokenizer", None), name)
            except PromptError as err:
                fit = [t.name for t in _TASKS.values() if t.model == name]
                hint = f" (tasks made for {name!r}: {', '.join(fit)})" if fit else ""
                raise PromptError(f"{err}{hint}") from None
        return prompts

    def metric(self) -> Metric:
        return self.make_metric()


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Register a task; refuses duplicates."""
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def get(name: str) -> Task:
    if name not in _TASKS:
        raise KeyError(f"task: unknown task {name!r}; available: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def list_tasks() -> list[Task]:
    return list(_TASKS.values())


def _bridge_and_name(model) -> tuple[Any, str]:  # (the model out of any Adapter, its name)
    from ..models.adapter import Adapter
    from ..models.state import loaded_name

    if isinstance(model, Adapter):
        return model.model, model.name
    return model, str(loaded_name(model) or type(model).__name__)


def _own_tokenizer(model_name: str):
    """The tokenizer of a bundled model without building its weights where that is cheap."""
    if model_name == "planted":
        from ..models.zoo.planted import build_tokenizer

        return build_tokenizer()
    if model_name == "minilm":
        from transformers import AutoTokenizer

        from ..models.zoo.minilm import minilm_dir

        return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    raise KeyError(model_name)


def _planted_copy(n: int, seed: int, model=None) -> PromptSet:
    from ..models.zoo.planted import planted_copy_data

    d = planted_copy_data(n_prompts=n, seed=seed)
    return PromptSet(
        tokens=d["clean"],
        corrupted=d["corrupted"],
        answers=d["answer"],
        wrong=d["wrong"],
        roles=d["roles"],
        text=tuple(d["text"]),
        name="planted-copy",
        vocab=vocab_fingerprint(_own_tokenizer("planted"), "planted"),
    )


register_task(
    Task(
        name="planted-copy",
        description="Copy the first name (S1) at '?' over the second name (S2); corrupted prompts "
        "replace S1 by a third name.",
        model="planted",
        mechanism="L0H0 copies S1 (faithful); L0H1 attends a zero-value token but copies S1 "
        "through 15% attention (misleading); L0H3 copies S1 and L1H0 backs it up only when it is "
        "absent (compensated pair); L0H4 copies S1 and writes a constant tag that silences L1H4, "
        "which backs it up only when L0H4 is zero-ablated: resample and mean ablation keep the "
        "tag, so under them L0H4 looks faithful and L1H4 inert (a pair only zero ablation shows); "
        "L0H2 sink, L1H1 previous-token and L1H3 self heads are inert; L1H2 is diffuse and "
        "negligible.",
        make_prompts=_planted_copy,
        make_metric=lambda: LogitDiff("END"),
    )
)


def _minilm_prompts(kind: str):
    def make(n: int, seed: int, model=None) -> PromptSet:
        from ..models.zoo import minilm

        if kind == "similarity":
            if model is None:
                from ..models.loading import load_model

                model = load_model("minilm")
            bridge, name = _bridge_and_name(model)
            d = minilm.similarity_data(bridge, n=n, seed=seed)  # through the model's tokenizer
            extra = {"pair_embedding": d["pair_embedding"]}
            vocab = vocab_fingerprint(bridge.tokenizer, name)
        else:
            tok = _own_tokenizer("minilm")
            d, extra = minilm.token_data(n=n, seed=seed, tokenizer=tok), {}
            vocab = vocab_fingerprint(tok, "minilm")
        return PromptSet(tokens=d["tokens"], attention_mask=d["attention_mask"],
                         corrupted=d["corrupted"], roles=d["roles"], text=tuple(d["text"]),
                         name=f"minilm-{kind}", extra=extra, vocab=vocab)

    return make


register_task(Task(
    name="minilm-similarity",
    description="Sentence-pair similarity with all-MiniLM-L6-v2: cosine of the first sentence's "
                "mean-pooled embedding with the paired sentence's clean embedding; corrupted "
                "first sentences swap one key word (same token count).",
    model="minilm",
    mechanism="Not planted: a real pretrained encoder. Expect [CLS]/[SEP] sink heads that are "
              "inert, and heads whose routing runs through the swapped KEY word.",
    make_prompts=_minilm_prompts("similarity"),
    make_metric=lambda: PairCosine(),
    default_n=24,
))
register_task(Task(
    name="minilm-token",
    description="How much an ambiguous word's final representation (role TOK) depends on each "
                "source: cosine with its clean final hidden state; corrupted sentences swap the "
                "context word that decides its meaning.",
    model="minilm",
    mechanism="Not planted. Heads that carry the disambiguating context word into TOK should "
              "have effects routed through that source.",
    make_prompts=_minilm_prompts("token"),
    make_metric=lambda: HiddenCosineToClean("TOK"),
    default_n=14,
))


def _char_task(kind: str, default_model: str):
    def make(n: int, seed: int, model=None) -> PromptSet:
        from ..models.zoo import char_tasks

        if model is None:
            from ..models.loading import load_model

            model = load_model(default_model)
        build = getattr(char_tasks, f"{kind}_prompts")
        bridge, name = _bridge_and_name(model)
        return build(bridge.tokenizer, n, seed, vocab_name=name)

    return make


register_task(Task(
    name="induction",
    description="Repeated random characters: BOS + R + R[:10]; predict R[10] (logit difference "
                "against a character not in R). Corrupted: the first copy of R replaced.",
    model="attn2",
    mechanism="Layer-1 induction heads attend from END to NEXT (the token after the earlier copy "
              "of the END token) and copy it; the layer-0 previous-token head (L0H3 in attn2) "
              "writes at NEXT which token preceded it, which the induction heads' keys read.",
    make_prompts=_char_task("induction", "attn2"),
    make_metric=lambda: LogitDiff("END"),
))
register_task(Task(
    name="duplicate-token",
    description="Distinct random characters, the last one repeating the one at DUP; predict the "
                "character after DUP. Corrupted: the character at DUP replaced.",
    model="attn2",
    mechanism="Heads that attend from END to DUP (duplicate-token pattern) or to NEXT "
              "(induction) carry the answer; NEXT is where the copied token sits.",
    make_prompts=_char_task("duplicate", "attn2"),
    make_metric=lambda: LogitDiff("END"),
))
register_task(Task(
    name="previous-token",
    description="Held-out stdlib text: log-probability of the true next character; corrupted "
                "prompts replace the character before END (PREV).",
    model="attn2",
    mechanism="The layer-0 previous-token head moves PREV's identity to END, where it combines "
              "with END's own token (skip-bigram statistics).",
    make_prompts=_char_task("previous_token", "attn2"),
    make_metric=lambda: AnswerLogProb("END"),
    default_n=96,  # natural text is heterogeneous: fewer prompts leave most verdicts open
))
register_task(Task(
    name="natural-text",
    description="Held-out stdlib text windows whose next character continues a bigram seen "
                "earlier in the window; log-probability of the true next character. Corrupted: "
                "the first half replaced by another window's.",
    model="gpt3l",
    mechanism="Induction heads (L1 in gpt3l) copy the character that followed the earlier "
              "occurrence; other heads add local n-gram statistics.",
    make_prompts=_char_task("natural_text", "gpt3l"),
    make_metric=lambda: AnswerLogProb("END"),
    default_n=96,
))
