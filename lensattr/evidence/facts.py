"""What a trained zoo model contains, measured: induction and previous-token scores, in-context
losses and head ablations (``facts.json`` of each folder in ``models/zoo/weights``; written by
``experiments/train_zoo.py``, re-checked by ``tests/test_zoo_trained.py``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.metrics import LogitsMetric
from ..core.prompts import PromptSet
from ..core.sites import Site
from ..core.types import HeadId
from ..models.adapter import Adapter
from ..models.zoo.trained import repeated_tokens, text_windows
from .engine import Engine
from .interventions import ablate

__all__ = ["measure_facts"]


def _nll(logits: Tensor, tokens: Tensor) -> Tensor:
    """[batch, pos-1]: negative log-likelihood of tokens[:, 1:] from logits[:, :-1]."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None])[..., 0]


def measure_facts(bridge, tokenizer, heldout: str | None = None, half: int = 40) -> dict:
    """Induction / previous-token scores per head, in-context losses and a head ablation.

    On 32 sequences BOS + R + R (R = ``half`` random tokens, seed 0), with positions 0..2T:

    * ``induction_score[L][h]``: mean attention from query i in T+1..2T to key i-T+1 (the
      token after the previous occurrence of token i);
    * ``prev_token_score[L][h]``: mean attention from query i in 1..2T to key i-1;
    * ``loss_first_half``: mean NLL of the tokens at 1..T; ``loss_second_half``: of the
      tokens at T+2..2T (the ones induction can predict);
    * ``ablate_top_induction``: second-half loss with that head zero-ablated (lensattr's zero
      ablation: ``hook_z`` set to the value bias b_V; likewise for the top previous-token
      head); ``ablate_all_induction``: with every head of induction score > 0.3 zero-ablated
      at once; ``heldout_loss``: on 64 held-out stdlib windows.
    """
    ad = Adapter(bridge)
    T = half
    toks = repeated_tokens(tokenizer, half=half)
    logits, cache = ad.run_with_cache(toks, sites=(Site.PATTERN,))
    q = torch.arange(T + 1, 2 * T + 1)
    qp = torch.arange(1, 2 * T + 1)
    ind, prev = [], []
    for layer in range(ad.n_layers):
        pat = cache[(Site.PATTERN, layer)].float()  # [batch, head_index, query_pos, key_pos]
        ind.append(pat[:, :, q, q - T + 1].mean((0, 2)).tolist())
        prev.append(pat[:, :, qp, qp - 1].mean((0, 2)).tolist())

    def halves(lg: Tensor) -> tuple[float, float]:
        nll = _nll(lg, toks)  # nll[:, j] is the loss of the token at position j + 1
        return nll[:, :T].mean().item(), nll[:, T + 1 :].mean().item()

    first, second = halves(logits)
    facts = {
        "n_layers": ad.n_layers,
        "n_heads": ad.n_heads,
        "induction_score": ind,
        "prev_token_score": prev,
        "loss_first_half": first,
        "loss_second_half": second,
    }

    def second_half(logits: Tensor, prompts) -> Tensor:  # [batch] mean NLL of T+2..2T
        return _nll(logits, prompts.tokens)[:, T + 1 :].mean(1)

    engine = Engine(ad, PromptSet(tokens=toks), LogitsMetric(second_half), progress=False)

    def ablated(heads: list[HeadId]) -> dict:
        loss = engine.run([ablate(*heads)]).values[0].mean().item()
        return {
            "heads": [list(hd) for hd in heads],
            "loss_second_half": loss,
            "increase": loss - second,
        }

    for kind, scores in (("induction", ind), ("prev_token", prev)):
        top = max(ad.heads(), key=lambda hd: scores[hd[0]][hd[1]])
        facts[f"top_{kind}_head"] = list(top)
        facts[f"top_{kind}_score"] = scores[top[0]][top[1]]
        facts[f"ablate_top_{kind}"] = ablated([top])
    facts["ablate_all_induction"] = ablated([hd for hd in ad.heads() if ind[hd[0]][hd[1]] > 0.3])
    if heldout is not None:
        win = text_windows(tokenizer, heldout)
        facts["heldout_loss"] = _nll(ad.forward(win), win).mean().item()
    return facts
