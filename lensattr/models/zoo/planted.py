"""A hand-wired 2-layer GPT-2 whose attention heads have planted, known roles.

Task ("planted-copy"), every prompt 7 tokens so positions are roles::

    <bos> A filler then B filler ?        metric: logit(A) - logit(B) at "?"

The corrupted prompt replaces A (S1) by a third name C, so its metric is ~0. Every weight is
set in code (no training, no randomness); :data:`PLANTED_TRUTH` says what each head really does.

Heads (2 layers x 7 heads): L0H0 faithful copy of S1; L0H1 decoy (attends a zero-value token,
its effect comes through S1); L0H2 sink; L0H3 / L1H0 a backup pair whose trigger depends on the
names (L0H3's tag T(A) silences L1H0's query); L0H4 / L1H4 a second backup pair whose trigger
does NOT depend on the prompt (L0H4 writes a constant tag K that silences L1H4's query), so
resample and mean ablation of L0H4 keep L1H4 off and only zero ablation shows the pair;
L1H1 previous-token, L1H3 self (inert, writing junk nobody reads); L1H2 diffuse and negligible.
L0H5 a sink carrier: at END it attends BOS 0.7 and S2 0.3, and only BOS has a non-zero value
(a gate G); L0H6 a constant-value head: W_V = 0 and b_V != 0, so it writes b_V @ W_O = H at
every position whatever its attention (END attends S1 0.8, BOS 0.2). L1H5 is silenced while
both G and H are present (its END query attends BOS, zero value) and otherwise copies S1
(+G3 on the metric). So L0H5's effect travels only through its BOS term, and L0H6's output
does not depend on attention at all: zero ablation (which keeps b_V, see
:mod:`lensattr.evidence.hooks`) leaves it, and every edge edit of it, without effect. Both gates
are the same on every prompt (BOS and b_V do not depend on the names), so resample and mean
ablation leave them: L0H5 shows its sink route under zero ablation only.
Clean metric 4 (L0H0) + 3 (L0H1) + 5 (L0H3) + 4 (L0H4) = 16; L1H0, L1H4 and L1H5 are off.

Why only zero ablation sees L0H4 / L1H4: every source's value in L0H4 carries kappa * K (read
from the position one-hots) and attention sums to one, so L0H4 writes exactly kappa * K at every
position of every prompt. Resample ablation substitutes the corrupted prompt's output, which
carries the same K; mean ablation substitutes the mean over prompts, which carries it too; both
keep L1H4 off. Zero ablation removes K, and L1H4 attends S1 and restores 3 of L0H4's 4. Removing
L0H4's S1 edge without renormalising also removes 0.9 of K and so switches L1H4 on as well.

Residual stream: one-hot coordinate subspaces. Dims 0/1 hold +C/-C at every position, so the
LayerNorm scale is ~constant (relative error ~|rest|^2 / C^2); dim 2 ("balance") makes every
written vector sum to zero, so the LayerNorm mean subtraction is a no-op. The LayerNorm gain
then undoes the scale, and LN(x) ~= x on every dimension a head reads.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from ..registry import ModelInfo, register_model
from .planted_layout import (
    A_B,
    A_D,
    A_F,
    A_G,
    A_P,
    A_Q,
    BAL,
    BETA,
    BIG,
    BOS,
    C_G,
    CONSTANT_HEAD,
    D_HEAD,
    D_MODEL,
    DECOY_WORD,
    E0,
    END,
    END_WORD,
    FILLER_POS,
    FILLERS,
    G0,
    G2,
    GAMMA,
    H0,
    J0,
    K0,
    KAPPA,
    LAMBDA,
    LAMBDA_G,
    LAMBDA_Q,
    N_HEADS,
    N_LAYERS,
    N_NAMES,
    N_POS,
    NAME_IDS,
    NAMES,
    OFF,
    P0,
    ROLES,
    SINK_BOS,
    SINK_GAIN,
    T0,
    TAG,
    TOKEN_ID,
    U0,
    VOCAB,
)
from .planted_truth import PLANTED_TRUTH
from .word_vocab import word_tokenizer

__all__ = ["NAMES", "FILLERS", "ROLES", "PLANTED_TRUTH", "build_planted", "planted_copy_data"]

# Target attention per query position: {source: probability}; unlisted sources get OFF.
_BOS_ONLY = {0: 1.0}


def _faithful(i):  # L0H0: END reads S1 (and sink-like fillers / BOS with zero value)
    return {1: 0.7, 0: 0.1, 2: 0.1, 5: 0.1} if i == END else _BOS_ONLY


def _decoy(i):  # L0H1: END looks at DECOY, whose value is zero; S1 carries its effect
    return {3: 0.82, 1: 0.15, 0: 0.03} if i == END else _BOS_ONLY


def _sink(i):  # L0H2: BOS 0.95, the rest over earlier filler positions (BOS 1.0 if none)
    earlier = [j for j in FILLER_POS if j < i]
    return {0: 0.95, **{j: 0.05 / len(earlier) for j in earlier}} if earlier else _BOS_ONLY


def _backup1(i):  # L0H3: END reads S1
    return {1: 0.9, 0: 0.1} if i == END else _BOS_ONLY


def _const_primary(i):  # L0H4 (P): END reads S1 0.9; every row also writes the constant tag K
    return {1: 0.9, 0: 0.1} if i == END else _BOS_ONLY


def _prev(i):  # L1H1: previous token 0.95, itself 0.05
    return {i - 1: 0.95, i: 0.05} if i > 0 else {0: 1.0}


def _uniform(i):  # L1H2: uniform over all causal positions
    return {j: 1.0 / (i + 1) for j in range(i + 1)}


def _self(i):  # L1H3: itself 0.9, BOS 0.1
    return {i: 0.9, 0: 0.1} if i > 0 else {0: 1.0}


def _sink_carrier(i):  # L0H5: END attends BOS 0.7, S2 0.3; other rows attend themselves
    if i == END:
        return {0: SINK_BOS, ROLES["S2"]: 1.0 - SINK_BOS}
    return {i: 1.0}


def _constant_value(i):  # L0H6: END attends S1 0.8, BOS 0.2; a copier's map, a constant value
    return {1: 0.8, 0: 0.2} if i == END else _BOS_ONLY


def _score_row(target: dict[int, float]) -> list[float]:
    """Scores ln(p) that make softmax hit ``target`` (up to the ~e^OFF mass of off sources)."""
    return [math.log(target[j]) if j in target else OFF for j in range(N_POS)]


def _position_qk(scores_at) -> tuple[torch.Tensor, torch.Tensor]:
    """W_Q, W_K [d_model, d_head] giving score ``scores_at(i)[j]`` for query i, key j.

    W_K maps position one-hot P(j) to key dim j; W_Q maps P(i) to query i's score row, times
    sqrt(d_head) because GPT-2 divides q.k by sqrt(d_head).
    """
    wq, wk = torch.zeros(D_MODEL, D_HEAD), torch.zeros(D_MODEL, D_HEAD)
    for j in range(N_POS):
        wk[P0 + j, j] = 1.0
    for i in range(N_POS):
        wq[P0 + i, :N_POS] = math.sqrt(D_HEAD) * torch.tensor(scores_at(i))
    return wq, wk


def _name_ov(gain: float, tag: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """W_V, W_O: name k -> gain * U(k) + tag * T(k); every other token has a zero value."""
    wv, wo = torch.zeros(D_MODEL, D_HEAD), torch.zeros(D_HEAD, D_MODEL)
    for k, t in enumerate(NAME_IDS):
        wv[E0 + t, k] = 1.0
        wo[k, U0 + k] = gain
        wo[k, T0 + k] = tag
    return wv, wo


def _const_tag_ov(gain: float, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W_V, W_O: name k -> gain * U(k); and every source, whatever its token, -> kappa * K.

    The constant part is read from the position one-hots (exactly one is 1 at every position),
    so the head writes sum_s alpha_s * kappa * K = kappa * K at every query: the same on every
    prompt, clean or corrupted, and kept by resample and mean ablation.
    """
    wv, wo = _name_ov(gain)
    wv[P0 : P0 + N_POS, N_NAMES] = 1.0
    wo[N_NAMES, K0] = kappa
    return wv, wo


def _junk_ov() -> tuple[torch.Tensor, torch.Tensor]:
    """W_V, W_O: token t -> J(t mod 8), a direction nothing downstream reads."""
    wv, wo = torch.zeros(D_MODEL, D_HEAD), torch.zeros(D_HEAD, D_MODEL)
    for t in range(len(VOCAB)):
        wv[E0 + t, t % 8] = 1.0
    for m in range(8):
        wo[m, J0 + m] = 1.0
    return wv, wo


def _bos_gate_ov() -> tuple[torch.Tensor, torch.Tensor]:
    """W_V, W_O: only the BOS token has a value, G / SINK_BOS (so END, attending BOS 0.7,
    writes exactly G); every other token's value is zero."""
    wv, wo = torch.zeros(D_MODEL, D_HEAD), torch.zeros(D_HEAD, D_MODEL)
    wv[E0 + TOKEN_ID[BOS], 0] = 1.0
    wo[0, G0] = 1.0 / SINK_BOS
    return wv, wo


def _constant_ov() -> tuple[torch.Tensor, torch.Tensor]:
    """W_V = 0 and W_O: d_head dim 0 -> H; the head's value is its bias b_V = e_0 (set in
    :func:`build_planted`), the same at every source."""
    wo = torch.zeros(D_HEAD, D_MODEL)
    wo[0, H0] = 1.0
    return torch.zeros(D_MODEL, D_HEAD), wo


def _gated_copy_qk() -> tuple[torch.Tensor, torch.Tensor]:
    """L1H5: END attends S1 (score 33 - 19 G - 19 H) against BOS (7); with both gates present
    the S1 score is -5 and END attends BOS (zero value); with either missing, S1 (>= 14)."""

    def scores_at(i):
        if i == END:
            return [GAMMA, C_G] + [OFF] * (N_POS - 2)
        return _score_row(_BOS_ONLY)

    wq, wk = _position_qk(scores_at)
    wq[G0, ROLES["S1"]] = -math.sqrt(D_HEAD) * LAMBDA_G
    wq[H0, ROLES["S1"]] = -math.sqrt(D_HEAD) * LAMBDA_G
    # H is present at every row: keep S1 off at the other rows' queries
    for i in range(N_POS):
        if i != END:
            wq[P0 + i, ROLES["S1"]] += math.sqrt(D_HEAD) * LAMBDA_G
    return wq, wk


def _backup2_qk() -> tuple[torch.Tensor, torch.Tensor]:
    """L1H0: END attends S1 unless L0H3's tag T(name at S1) is present; else BOS."""

    # Position part: END query scores BOS gamma, S1 beta, the rest OFF; other queries -> BOS.
    def scores_at(i):
        return [GAMMA, BETA] + [OFF] * (N_POS - 2) if i == END else _score_row(_BOS_ONLY)

    wq, wk = _position_qk(scores_at)
    # Name identity: key dim 8+k marks "this source is name k"; the query's tag T(k)
    # (written only at END, by L0H3) pushes name-k sources down by LAMBDA * T_k.
    for k, t in enumerate(NAME_IDS):
        wk[E0 + t, N_POS + k] = 1.0
        wq[T0 + k, N_POS + k] = -math.sqrt(D_HEAD) * LAMBDA
    return wq, wk


def _const_backup_qk() -> tuple[torch.Tensor, torch.Tensor]:
    """L1H4 (Q): END attends S1 unless P's constant tag K is present; else BOS (zero value)."""

    def scores_at(i):
        return [GAMMA, BETA] + [OFF] * (N_POS - 2) if i == END else _score_row(_BOS_ONLY)

    wq, wk = _position_qk(scores_at)
    # Key dim 1 is "this source is position S1"; the query's K pushes it down by LAMBDA_Q * K.
    wq[K0, ROLES["S1"]] = -math.sqrt(D_HEAD) * LAMBDA_Q
    return wq, wk


def _heads() -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per layer, per head: (W_Q, W_K, W_V, W_O)."""
    layer0 = [
        (*_position_qk(lambda i: _score_row(_faithful(i))), *_name_ov(A_F / 0.7)),  # faithful
        (*_position_qk(lambda i: _score_row(_decoy(i))), *_name_ov(A_D / 0.15)),  # decoy
        (*_position_qk(lambda i: _score_row(_sink(i))), *_name_ov(SINK_GAIN)),  # sink
        (*_position_qk(lambda i: _score_row(_backup1(i))), *_name_ov(A_B / 0.9, TAG)),  # B1
        (*_position_qk(lambda i: _score_row(_const_primary(i))), *_const_tag_ov(A_P / 0.9, KAPPA)),
        (*_position_qk(lambda i: _score_row(_sink_carrier(i))), *_bos_gate_ov()),  # sink carrier
        (*_position_qk(lambda i: _score_row(_constant_value(i))), *_constant_ov()),  # constant
    ]
    layer1 = [
        (*_backup2_qk(), *_name_ov(G2)),  # B2: real backup of L0H3
        (*_position_qk(lambda i: _score_row(_prev(i))), *_junk_ov()),  # inert previous-token
        (*_position_qk(lambda i: _score_row(_uniform(i))), *_junk_ov()),  # diffuse, negligible
        (*_position_qk(lambda i: _score_row(_self(i))), *_junk_ov()),  # inert self
        (*_const_backup_qk(), *_name_ov(A_Q)),  # Q: backup of L0H4, silenced by its tag K
        (*_gated_copy_qk(), *_name_ov(A_G)),  # gated copier: off while G and H are present
        (*_position_qk(lambda i: _score_row(_uniform(i))), *_junk_ov()),  # diffuse, negligible
    ]
    return [layer0, layer1]


def _balance(rows: torch.Tensor) -> torch.Tensor:
    """Make every row (a vector written into the residual stream) sum to zero via dim BAL."""
    rows = rows.clone()
    rows[:, BAL] -= rows.sum(dim=1)
    return rows


def _one_hot(n: int, start: int) -> torch.Tensor:
    """n residual vectors, row r the one-hot of dim start + r."""
    rows = torch.zeros(n, D_MODEL)
    rows[torch.arange(n), start + torch.arange(n)] = 1.0
    return rows


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over :data:`VOCAB`; <bos> (id 0) is bos/eos/pad/unk."""
    return word_tokenizer(VOCAB, "planted")


def build_planted() -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """The planted model and its tokenizer; deterministic, leaves the global RNG untouched."""
    cfg = GPT2Config(
        vocab_size=len(VOCAB), n_positions=N_POS, n_embd=D_MODEL, n_layer=N_LAYERS,
        n_head=N_HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
        n_inner=4,  # the MLPs are all zero; a small width keeps them cheap
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        model = GPT2LMHeadModel(cfg)
    ln_gain = torch.full((D_MODEL,), BIG * math.sqrt(2.0 / D_MODEL))
    ln_gain[:2] = 0.0  # the constant dims are dropped after normalisation
    tr = model.transformer
    with torch.no_grad():
        for p in model.parameters():  # every bias, the MLPs and anything not set below: zero
            p.zero_()
        # Token embedding: E(t) one-hot.
        tr.wte.weight.copy_(_balance(_one_hot(len(VOCAB), E0)))
        # Position embedding: +C/-C constant dims and P(i) one-hot.
        wpe = _one_hot(N_POS, P0)
        wpe[:, 0], wpe[:, 1] = BIG, -BIG
        tr.wpe.weight.copy_(_balance(wpe))
        for layer, heads in enumerate(_heads()):
            block = cast(GPT2Block, tr.h[layer])  # ModuleList items are typed Module
            # Attention: c_attn is Conv1D [d_model, 3 * d_model] = [Q heads | K heads | V heads].
            for h, (wq, wk, wv, wo) in enumerate(heads):
                for part, w in enumerate((wq, wk, wv)):
                    col = part * D_MODEL + h * D_HEAD
                    block.attn.c_attn.weight[:, col : col + D_HEAD] = w
                block.attn.c_proj.weight[h * D_HEAD : (h + 1) * D_HEAD] = _balance(wo)
            if layer == 0:  # the constant-value head's value bias b_V = e_0
                block.attn.c_attn.bias[2 * D_MODEL + CONSTANT_HEAD * D_HEAD] = 1.0
            # LayerNorms: LN(x) ~= x off the constant dims (ln_2 feeds the all-zero MLP).
            block.ln_1.weight.copy_(ln_gain)
            block.ln_2.weight.copy_(ln_gain)
        tr.ln_f.weight.copy_(ln_gain)
        # Unembedding: logit of name k = its answer coordinate U(k); other tokens get 0.
        for k, t in enumerate(NAME_IDS):
            model.lm_head.weight[t, U0 + k] = 1.0
    model.eval()
    return model, build_tokenizer()


def planted_copy_data(n_prompts: int = 32, seed: int = 0) -> dict:
    """Clean/corrupted prompts for the planted-copy task, drawn with ``torch.Generator(seed)``.

    Returns tokens ``clean`` / ``corrupted`` [n, 7] (BOS included), ``answer`` (A) and ``wrong``
    (B) token ids [n], ``roles`` (role -> position) and ``text`` / ``corrupted_text`` (without
    the BOS, which ``to_tokens`` prepends).
    """
    if n_prompts < 1:
        raise ValueError(f"n_prompts: expected >= 1, got {n_prompts}")
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, N_NAMES, (n_prompts,), generator=g)
    b = (a + torch.randint(1, N_NAMES, (n_prompts,), generator=g)) % N_NAMES  # B != A
    r = torch.randint(0, N_NAMES - 2, (n_prompts,), generator=g)  # C: r-th name not in {A, B}
    fill = torch.randint(0, len(FILLERS), (n_prompts, 2), generator=g)
    clean, corrupted, texts, ctexts = [], [], [], []
    for ai, bi, ri, (f1, f2) in zip(a.tolist(), b.tolist(), r.tolist(), fill.tolist(), strict=True):
        ci = [k for k in range(N_NAMES) if k not in (ai, bi)][ri]
        words = [NAMES[ai], FILLERS[f1], DECOY_WORD, NAMES[bi], FILLERS[f2], END_WORD]
        cwords = [NAMES[ci], *words[1:]]
        clean.append([TOKEN_ID[w] for w in (BOS, *words)])
        corrupted.append([TOKEN_ID[w] for w in (BOS, *cwords)])
        texts.append(" ".join(words))
        ctexts.append(" ".join(cwords))
    return {
        "clean": torch.tensor(clean, dtype=torch.long),
        "corrupted": torch.tensor(corrupted, dtype=torch.long),
        "answer": torch.tensor([NAME_IDS[k] for k in a.tolist()], dtype=torch.long),
        "wrong": torch.tensor([NAME_IDS[k] for k in b.tolist()], dtype=torch.long),
        "roles": dict(ROLES),
        "text": texts,
        "corrupted_text": ctexts,
    }



register_model(
    ModelInfo(
        name="planted",
        description="hand-wired GPT-2 with planted head roles for the planted-copy task "
        "(<bos> A filler then B filler ? -> A)",
        size="2 layers x 7 heads, d_model 112, 17-token vocab",
        recipe="hand-wired in code (lensattr/zoo/planted.py)",
        contains="faithful, decoy, sink, two backup pairs (one invisible to resample "
        "ablation), a sink carrier, a constant-value head, inert heads; see PLANTED_TRUTH",
        builder=build_planted,
    )
)
