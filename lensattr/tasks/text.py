"""Text tasks from the interpretability literature, for real pretrained decoders (made for
the bundled ``smollm2``; any model whose tokenizer can express them works):

* ``ioi`` — indirect-object identification (Wang et al. 2022);
* ``repeat-tokens`` — induction on repeated random tokens (Elhage et al. 2021; Olsson et al.
  2022);
* ``capital-recall`` — factual recall of capital cities (Meng et al. 2022; Geva et al. 2023).

Every builder takes the model's tokenizer and refuses one that cannot express the task (a
name, country or capital that is not one token with its leading space, templates that do not
tokenise to one layout, no BOS token), naming the problem, instead of building meaningless
prompts. Prompts start with the tokenizer's BOS token, as ``TransformerBridge.to_tokens`` does
(``<|im_start|>`` for SmolLM2, whose HF tokenizer adds none by itself); ``PromptSet.text``
shows it. Clean and corrupted prompts have one length, so every role is a position.
:func:`check_task` measures whether a model does a task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..core.metrics import LogitDiff
from ..core.prompts import PromptSet
from ..models.adapter import ModelError
from .bundled import Task, register_task

__all__ = ["NAMES", "PLACES", "OBJECTS", "IOI_TEMPLATES", "CAPITALS", "ioi_prompts",
           "repeat_tokens_prompts", "capital_prompts", "word_tokens", "TaskCheck", "check_task"]

NAMES = ("Mary John Tom James Dan Sid Martin Amy Alice Bob Paul Anna Kate Mark Jack Sarah Lisa "
         "David Michael Emma Ben Sam Max Lucy Ryan Adam Laura Rose Jane Peter").split()
PLACES = ("store park school garden office beach market station restaurant hospital library "
          "house kitchen church river zoo lake mall").split()
OBJECTS = ("drink ring book bone kiss computer snack letter bag necklace gift toy ball flower pen "
           "cake bottle").split()
# {A} and {B} are the first two names (ABBA: A = IO, B = S1; BABA: A = S1, B = IO), {S} = S2.
IOI_TEMPLATES = (
    "When {A} and {B} went to the {P}, {S} gave a {O} to",
    "After {A} and {B} went to the {P}, {S} gave a {O} to",
    "While {A} and {B} were at the {P}, {S} handed a {O} to",
    "When {A} and {B} arrived at the {P}, {S} gave a {O} to",
    "Once {A} and {B} got to the {P}, {S} passed a {O} to",
    "After {A} and {B} met at the {P}, {S} offered a {O} to",
)
CAPITALS = (("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
            ("Greece", "Athens"), ("Canada", "Ottawa"), ("Poland", "Warsaw"),
            ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Portugal", "Lisbon"),
            ("India", "Delhi"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Cuba", "Havana"),
            ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
            ("England", "London"))
CAPITAL_TEMPLATE = "The capital of {C} is"


def _refuse(task: str, problem: str) -> ModelError:
    return ModelError(f"task {task!r}: the model's tokenizer cannot express it: {problem}")


def _tokenizer(model, task: str):
    """The tokenizer of a model (a bridge), or ``model`` itself when it is a tokenizer."""
    tok = model.tokenizer if hasattr(model, "tokenizer") else model
    if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
        raise ModelError(f"task {task!r}: the model has no tokenizer to build prompts with")
    return tok


def _bos(tok, task: str) -> int:
    if getattr(tok, "bos_token_id", None) is None:
        raise _refuse(task, "it has no BOS token to start the prompts with")
    return int(tok.bos_token_id)


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _one_token(tok, words, what: str, task: str) -> dict[str, int]:
    """word -> the id of ``" " + word``; refuses words that are not exactly one token."""
    ids, bad = {}, []
    for w in words:
        t = _encode(tok, " " + w)
        if len(t) == 1:
            ids[w] = t[0]
        else:
            bad.append(f"{' ' + w!r} is {len(t)} tokens {tok.convert_ids_to_tokens(t)}")
    if bad:
        more = f" (and {len(bad) - 4} more)" if len(bad) > 4 else ""
        raise _refuse(task, f"every {what} must be one token with its leading space, but "
                      + "; ".join(bad[:4]) + more)
    if len(set(ids.values())) != len(ids):
        raise _refuse(task, f"two {what}s share a token")
    return ids


def _tokens(tok, bos: int, text: str, slots: dict[int, int], length: int, task: str,
            template: str) -> list[int]:
    """[BOS] + tokens of ``text``, checked to be ``length`` long with id ``slots[pos]`` at pos."""
    ids = [bos] + _encode(tok, text)
    if len(ids) != length or any(ids[p] != i for p, i in slots.items()):
        raise _refuse(task, f"template {template!r} does not tokenise to one layout with "
                      f"single-token slots ({text!r} -> {tok.convert_ids_to_tokens(ids)})")
    return ids


def ioi_prompts(tokenizer, n: int, seed: int = 0, orders: tuple[str, ...] = ("ABBA", "BABA")
                ) -> PromptSet:
    """IOI prompts: BOS + a template, e.g. "When Mary and John went to the store, John gave
    a drink to"; answer IO (" Mary"), wrong S (" John"); metric logit(IO) - logit(S) at END.

    Prompt i uses order ``orders[i % len(orders)]`` (balanced ABBA / BABA), a random template,
    place, object and two distinct names. Corrupted (ABC): the three name slots get three
    fresh names (distinct, none of them IO or S). Every prompt has 15 tokens with BOS = 0,
    the first names at 2 and 4, S2 at 10, END at 14; IO and S1 are 2 and 4 in ABBA, 4 and 2
    in BABA (so with both orders the roles IO/S1 are per-prompt positions)."""
    task = "ioi"
    tok = _tokenizer(tokenizer, task)
    bad = [o for o in orders if o not in ("ABBA", "BABA")]
    if bad or not orders:
        raise ValueError(f"orders: expected 'ABBA' and/or 'BABA', got {orders!r}")
    bos = _bos(tok, task)
    names = _one_token(tok, NAMES, "name", task)
    places, objs = _one_token(tok, PLACES, "place", task), _one_token(tok, OBJECTS, "object", task)
    # layout from the first template: BOS + When A and B went to the P , S gave a O to
    probe = [bos] + _encode(tok, IOI_TEMPLATES[0].format(A="Mary", B="John", P="store",
                                                         S="John", O="drink"))
    a_pos, b_pos = probe.index(names["Mary"]), probe.index(names["John"])
    s_pos = probe.index(names["John"], b_pos + 1)
    p_pos, o_pos, length = probe.index(places["store"]), probe.index(objs["drink"]), len(probe)
    g = torch.Generator().manual_seed(seed)

    def pick(pool: list[str]) -> str:
        return pool[int(torch.randint(len(pool), (1,), generator=g))]

    clean: list[list[int]] = []
    corrupted: list[list[int]] = []
    ans, wrong, io_pos, s1_pos, text = [], [], [], [], []
    for i in range(n):
        template = IOI_TEMPLATES[int(torch.randint(len(IOI_TEMPLATES), (1,), generator=g))]
        io, s, c1, c2, c3 = (NAMES[j] for j in torch.randperm(len(NAMES), generator=g)[:5])
        p, o = pick(PLACES), pick(OBJECTS)
        abba = orders[i % len(orders)] == "ABBA"
        a, b = (io, s) if abba else (s, io)
        for (x, y, z), out in (((a, b, s), clean), ((c1, c2, c3), corrupted)):
            t = template.format(A=x, B=y, P=p, S=z, O=o)
            slots = {a_pos: names[x], b_pos: names[y], s_pos: names[z]}
            slots.update({p_pos: places[p], o_pos: objs[o]})
            out.append(_tokens(tok, bos, t, slots, length, task, template))
            if out is clean:
                text.append(tok.bos_token + t)
        ans.append(names[io])
        wrong.append(names[s])
        io_pos.append(a_pos if abba else b_pos)
        s1_pos.append(b_pos if abba else a_pos)
    roles: dict[str, int | list[int]] = {"BOS": 0, "IO": io_pos, "S1": s1_pos, "S2": s_pos,
                                         "END": length - 1}
    return PromptSet(tokens=clean, corrupted=corrupted, answers=ans, wrong=wrong, roles=roles,
                     text=tuple(text), name="ioi")


def word_tokens(tokenizer) -> torch.Tensor:
    """Ids of the tokens that are a space plus 3 or more ASCII letters (" table") and encode
    back to themselves: ordinary words, no specials, digits or punctuation."""
    tok = _tokenizer(tokenizer, "repeat-tokens")
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    words = tok.batch_decode([[i] for i in ids])
    cand = [(i, w) for i, w in zip(ids, words, strict=True)
            if len(w) >= 4 and w[0] == " " and w[1:].isascii() and w[1:].isalpha()]
    if not cand:
        return torch.zeros(0, dtype=torch.long)
    back = tok([w for _, w in cand], add_special_tokens=False)["input_ids"]
    return torch.tensor(sorted(i for (i, _), b in zip(cand, back, strict=True) if b == [i]))


def repeat_tokens_prompts(tokenizer, n: int, seed: int = 0, half: int = 10, k: int = 8
                          ) -> PromptSet:
    """BOS + R + R[:k] (R: ``half`` distinct random word tokens, :func:`word_tokens`); answer
    R[k], wrong a word token not in the prompt; metric logit diff at END. Corrupted: the first
    copy of R replaced by other random words (END is unchanged, nothing earlier says what
    comes next). Roles: BOS 0, PREV = k (the earlier copy of the END token), NEXT = k + 1
    (the token after it, where an induction head looks), END = half + k."""
    task = "repeat-tokens"
    tok = _tokenizer(tokenizer, task)
    bos = _bos(tok, task)
    if not 1 <= k < half:
        raise ValueError(f"k: expected 1 <= k < half ({half}), got {k}")
    allowed = word_tokens(tok)
    if len(allowed) < 4 * (2 * half + 1):
        raise _refuse(task, f"it has only {len(allowed)} single-token words (' ' + letters); "
                      f"need at least {4 * (2 * half + 1)}")
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[: 2 * half + 1]]
                        for _ in range(n)])  # [n, 2 * half + 1] distinct in each row
    R, R2, spare = rows[:, :half], rows[:, half : 2 * half], rows[:, 2 * half]
    b = torch.full((n, 1), bos)
    clean = torch.cat([b, R, R[:, :k]], 1)  # [n, 1 + half + k]
    corrupted = torch.cat([b, R2, R[:, :k]], 1)
    text = tuple(tok.bos_token + tok.decode(r) for r in clean[:, 1:].tolist())
    return PromptSet(tokens=clean, corrupted=corrupted, answers=R[:, k], wrong=spare,
                     roles={"BOS": 0, "PREV": k, "NEXT": k + 1, "END": half + k}, text=text,
                     name="repeat-tokens")


def capital_prompts(tokenizer, n: int, seed: int = 0) -> PromptSet:
    """BOS + "The capital of France is"; answer the capital (" Paris"), wrong the capital of
    the corrupted prompt's country; metric logit diff at END. Corrupted: another country
    (" Italy"), so the two prompts' answers swap. Prompt i asks about country
    ``order[i % 23]`` (a seeded permutation of :data:`CAPITALS`), the corrupted country is
    drawn among the others. Roles: BOS 0, SUBJ = the country, END the last token."""
    task = "capital-recall"
    tok = _tokenizer(tokenizer, task)
    bos = _bos(tok, task)
    countries = _one_token(tok, [c for c, _ in CAPITALS], "country", task)
    capitals = _one_token(tok, [c for _, c in CAPITALS], "capital", task)
    probe = [bos] + _encode(tok, CAPITAL_TEMPLATE.format(C=CAPITALS[0][0]))
    subj, length = probe.index(countries[CAPITALS[0][0]]), len(probe)
    g = torch.Generator().manual_seed(seed)
    m = len(CAPITALS)
    order = torch.randperm(m, generator=g).tolist()
    clean: list[list[int]] = []
    corrupted: list[list[int]] = []
    ans, wrong, text = [], [], []
    for i in range(n):
        c = order[i % m]
        d = (c + 1 + int(torch.randint(m - 1, (1,), generator=g))) % m  # any other country
        for j, out in ((c, clean), (d, corrupted)):
            t = CAPITAL_TEMPLATE.format(C=CAPITALS[j][0])
            out.append(_tokens(tok, bos, t, {subj: countries[CAPITALS[j][0]]}, length, task,
                               CAPITAL_TEMPLATE))
        ans.append(capitals[CAPITALS[c][1]])
        wrong.append(capitals[CAPITALS[d][1]])
        text.append(tok.bos_token + CAPITAL_TEMPLATE.format(C=CAPITALS[c][0]))
    return PromptSet(tokens=clean, corrupted=corrupted, answers=ans, wrong=wrong,
                     roles={"BOS": 0, "SUBJ": subj, "END": length - 1}, text=tuple(text),
                     name="capital-recall")


@dataclass(frozen=True)
class TaskCheck:
    """Does a model do a task? Metric = the task's logit difference at END, per prompt.

    ``accuracy``: share of clean prompts with metric > 0 (the answer beats the wrong token);
    ``top1``: share whose top token at END is the answer; ``gap`` = clean_mean -
    corrupted_mean. ``passed``: accuracy >= 0.8 and gap >= 1 (nats)."""

    task: str
    model: str
    n_prompts: int
    seed: int
    clean_mean: float
    corrupted_mean: float
    gap: float
    accuracy: float
    corrupted_accuracy: float
    top1: float
    bos: str

    @property
    def passed(self) -> bool:
        return self.accuracy >= 0.8 and self.gap >= 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def check_task(model, task, n_prompts: int | None = None, seed: int = 0) -> TaskCheck:
    """Run a text task's clean and corrupted prompts through ``model`` (no interventions)."""
    from .. import tasks as registry
    from ..models.adapter import Adapter

    task = registry.get(task) if isinstance(task, str) else task
    ad = Adapter(model)
    p = task.prompts(n_prompts, seed, ad.model)
    rows = torch.arange(len(p))
    end = p.roles["END"]

    def run(tokens):
        logits = ad.forward(tokens)[rows, end].float()  # [batch, d_vocab]
        return logits[rows, p.answers] - logits[rows, p.wrong], logits.argmax(-1)

    clean, top = run(p.tokens)
    corr, _ = run(p.corrupted)
    bos = getattr(getattr(ad.model, "tokenizer", None), "decode", lambda x: "?")(p.tokens[:1, 0])
    return TaskCheck(task=task.name, model=ad.name, n_prompts=len(p), seed=seed,
                     clean_mean=clean.mean().item(), corrupted_mean=corr.mean().item(),
                     gap=(clean.mean() - corr.mean()).item(),
                     accuracy=(clean > 0).float().mean().item(),
                     corrupted_accuracy=(corr > 0).float().mean().item(),
                     top1=(top == p.answers).float().mean().item(), bos=bos)


def _make(build):
    def make(n: int, seed: int, model=None) -> PromptSet:
        if model is None:  # only the tokenizer is needed: no model is booted
            from ..models.zoo.smollm2 import load_tokenizer

            model = load_tokenizer()
        return build(model, n, seed)

    return make


_BOS_NOTE = " Prompts start with the tokenizer's BOS token (<|im_start|> for smollm2)."
register_task(Task(
    name="ioi",
    description="Indirect-object identification (Wang et al. 2022): \"When Mary and John went to "
                "the store, John gave a drink to\" -> \" Mary\". Six templates of 15 tokens, "
                "30 single-token names, ABBA and BABA orders alternating; corrupted (ABC): the "
                "three name slots get three fresh names. Metric logit(IO) - logit(S) at END; "
                "roles BOS, IO, S1, S2, END." + _BOS_NOTE,
    model="smollm2",
    mechanism="In GPT-2 small (Wang et al. 2022): duplicate-token heads (at S2, attend S1) and "
              "induction heads (at S2, attend S1+1, fed by previous-token heads) mark S as "
              "repeated; S-inhibition heads (at END, attend S2) move that signal to END, where "
              "it keeps the name movers' queries off S; name movers (at END, attend IO) copy IO "
              "into the logits; negative name movers attend IO and write against it; backup "
              "name movers take over when the name movers are ablated. Nobody has published "
              "SmolLM2's circuit: experiments/smollm2_ioi.py reports which roles lensattr finds.",
    make_prompts=_make(ioi_prompts),
    make_metric=lambda: LogitDiff("END"),
))
register_task(Task(
    name="repeat-tokens",
    description="Induction on repeated random word tokens: BOS + R + R[:8] (R = 10 distinct "
                "random ' word' tokens); predict R[8] (logit difference against a word not in "
                "the prompt). Corrupted: the first copy of R replaced by other words; roles "
                "BOS, PREV, NEXT, END." + _BOS_NOTE,
    model="smollm2",
    mechanism="Induction heads (Elhage et al. 2021; Olsson et al. 2022) attend from END to NEXT "
              "(the token after the earlier copy of the END token) and copy it; previous-token "
              "heads in earlier layers write at NEXT which token preceded it, which the "
              "induction heads' keys read (K-composition).",
    make_prompts=_make(repeat_tokens_prompts),
    make_metric=lambda: LogitDiff("END"),
))
register_task(Task(
    name="capital-recall",
    description="Factual recall: \"The capital of France is\" -> \" Paris\" (23 countries "
                "whose name and capital are one token each). Corrupted: another country; "
                "metric logit(capital) - logit(the corrupted country's capital) at END; roles "
                "BOS, SUBJ, END." + _BOS_NOTE,
    model="smollm2",
    mechanism="Meng et al. 2022 (causal tracing) and Geva et al. 2023: early-to-middle MLPs "
              "enrich the subject's last token (SUBJ) with its attributes; the relation "
              "('capital of') is propagated to END; attribute-extraction attention heads in "
              "the upper layers attend from END to SUBJ and copy the capital. Much of the "
              "effect lives in MLPs, which a head audit does not see: expect a few relevant "
              "heads whose effect routes through END->SUBJ.",
    make_prompts=_make(capital_prompts),
    make_metric=lambda: LogitDiff("END"),
    default_n=23,
))
