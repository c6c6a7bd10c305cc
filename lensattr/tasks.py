"""The task registry: prompts (+ corrupted prompts, answers, roles), a metric, a default model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .metrics import AnswerLogProb, HiddenCosineToClean, LogitDiff, Metric, PairCosine
from .prompts import PromptSet

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
        load their default model when ``model`` is None."""
        n = self.default_n if n_prompts is None else int(n_prompts)
        if n < 1:
            raise ValueError(f"n_prompts: expected at least 1, got {n}")
        return self.make_prompts(n, seed, model)

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


def _planted_copy(n: int, seed: int, model=None) -> PromptSet:
    from .zoo.planted import planted_copy_data

    d = planted_copy_data(n_prompts=n, seed=seed)
    return PromptSet(
        tokens=d["clean"],
        corrupted=d["corrupted"],
        answers=d["answer"],
        wrong=d["wrong"],
        roles=d["roles"],
        text=tuple(d["text"]),
        name="planted-copy",
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
        from .zoo import minilm

        if kind == "similarity":
            if model is None:
                from .loading import load_model

                model = load_model("minilm")
            d = minilm.similarity_data(model, n=n, seed=seed)
            extra = {"pair_embedding": d["pair_embedding"]}
        else:
            d, extra = minilm.token_data(n=n, seed=seed), {}
        return PromptSet(tokens=d["tokens"], attention_mask=d["attention_mask"],
                         corrupted=d["corrupted"], roles=d["roles"], text=tuple(d["text"]),
                         name=f"minilm-{kind}", extra=extra)

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
        from .zoo import char_tasks

        if model is None:
            from .loading import load_model

            model = load_model(default_model)
        build = getattr(char_tasks, f"{kind}_prompts")
        return build(model.tokenizer, n, seed)

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
