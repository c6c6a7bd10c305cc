"""Input-token importance for a metric, by captum: gradient x input, integrated gradients,
occlusion (blank-out), LIME and KernelSHAP.

Every method acts on the word (token) embeddings alone: ``Site.WORD_EMBED``, the embedding
module's own output. Positions and token types are kept: a model adds them, and BERT applies
its embedding LayerNorm, after that site, so a blanked-out word still has its position. (On
GPT-2 / Llama that site is hook_embed; on BERT bridges hook_embed is the post-LayerNorm sum of
all three.) A token's score is the sum over its embedding dimensions (gradient methods) or the
attribution of the feature group made of its whole embedding (perturbation methods). The
blank-out baseline is the zero word embedding. Scores are
signed, in the metric's units for integrated gradients, occlusion, LIME and KernelSHAP
(completeness: IG and SHAP sum to metric(x) - metric(baseline)); padded tokens are NaN.

captum is an optional dependency (``pip install "lensattr[explain]"``); LIME and KernelSHAP fit
their surrogate with scikit-learn (unregularised least squares, so on an additive model they
recover the exact per-token contributions).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..compare.token_importance import SITE, site_meta
from .edits import evaluate
from .setup import Setup, prepare

__all__ = ["METHODS", "TokenAttributions", "attribute_embeddings", "token_attributions",
           "occlusion", "attributions_from"]

METHODS = ("grad_x_input", "integrated_gradients", "occlusion", "lime", "kernel_shap")


def _captum():
    try:
        import captum.attr as attr
        from captum._utils.models.linear_model import SkLearnLinearRegression
    except ImportError:
        raise ImportError('token attributions need captum: pip install "lensattr[explain]"  '
                          "(or: pip install captum scikit-learn)") from None
    return attr, SkLearnLinearRegression


def check_methods(methods) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods: expected some of {METHODS}, got {methods!r}")
    return methods


@dataclass
class TokenAttributions:
    """``scores[method]``: [batch, pos] signed importance of each input token (NaN on padding).
    ``meta``: methods, parameters, baseline, seconds per method."""

    scores: dict[str, Tensor]
    meta: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per (prompt, position) with one column per method."""
        any_ = next(iter(self.scores.values()))
        b, p = any_.shape
        frame = pd.DataFrame({"prompt": torch.arange(b).repeat_interleave(p).numpy(),
                              "pos": torch.arange(p).repeat(b).numpy()})
        for name, v in self.scores.items():
            frame[name] = v.reshape(-1).numpy()
        return frame.dropna(subset=list(self.scores)[:1]).reset_index(drop=True)


def attribute_embeddings(
    forward: Callable[[Tensor], Tensor],
    embeds: Float[Tensor, "1 pos d_model"],
    baseline: Float[Tensor, "1 pos d_model"],
    methods=METHODS,
    n_steps: int = 32,
    n_samples: int = 200,
    perturbations_per_eval: int = 16,
    seed: int = 0,
) -> TokenAttributions:
    """Per-token scores of one input for ``forward`` ([n, pos, d_model] -> [n]), one token =
    one feature (its whole embedding)."""
    attr, LinReg = _captum()
    methods = check_methods(methods)
    mask = torch.arange(embeds.shape[1], device=embeds.device)[None, :, None].expand_as(embeds)
    ppe = perturbations_per_eval
    out, secs = {}, {}
    for name in methods:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if name == "grad_x_input":
                a = attr.InputXGradient(forward).attribute(embeds.clone().requires_grad_())
            elif name == "integrated_gradients":
                a = attr.IntegratedGradients(forward).attribute(
                    embeds, baselines=baseline, n_steps=n_steps, internal_batch_size=ppe)
            elif name == "occlusion":
                a = attr.Occlusion(forward).attribute(
                    embeds, sliding_window_shapes=(1, embeds.shape[2]),
                    strides=(1, embeds.shape[2]), baselines=baseline,
                    perturbations_per_eval=ppe)
            elif name == "lime":
                a = attr.Lime(forward, interpretable_model=LinReg()).attribute(
                    embeds, baselines=baseline, feature_mask=mask, n_samples=n_samples,
                    perturbations_per_eval=ppe)
            else:
                a = attr.KernelShap(forward).attribute(
                    embeds, baselines=baseline, feature_mask=mask, n_samples=n_samples,
                    perturbations_per_eval=ppe)
        if name in ("lime", "kernel_shap", "occlusion"):
            a = a[:, :, 0]  # every dimension of a token carries the token's attribution
        else:
            a = a.sum(-1)
        out[name] = a.detach().double().cpu()
        secs[name] = time.perf_counter() - t0
    return TokenAttributions(out, {"methods": list(methods), "seconds": secs})


def attributions_from(s: Setup, methods=METHODS, n_steps: int = 32, n_samples: int = 200,
                      perturbations_per_eval: int = 16, seed: int = 0) -> TokenAttributions:
    methods = check_methods(methods)
    store: dict = {}
    s.adapter.forward(s.prompts.tokens, s.prompts.attention_mask,
                      s.adapter.capture_hooks((SITE,), store))
    emb = store[(SITE, None)]  # [batch, pos, d_model] word embeddings
    valid = s.prompts.valid
    scores = {m: torch.full(s.prompts.tokens.shape, torch.nan, dtype=torch.float64)
              for m in methods}
    secs = dict.fromkeys(methods, 0.0)
    for i in range(len(s.prompts)):
        x = emb[i:i + 1]
        base = torch.where(valid[i].to(x.device)[None, :, None], 0.0, x)  # padding: unchanged

        def forward(e, _i=i):
            idx = torch.full((e.shape[0],), _i, dtype=torch.long)
            hooks = {(SITE, None): lambda _x, _e=e: _e.to(_x.dtype)}
            clean = s.clean.values[idx.to(s.clean.values.device)]
            return evaluate(s.adapter, s.prompts.take(idx), s.metric, hooks, clean_values=clean,
                            grad=torch.is_grad_enabled()).metric

        got = attribute_embeddings(forward, x, base, methods, n_steps, n_samples,
                                   perturbations_per_eval, seed + i)
        for m in methods:
            scores[m][i] = torch.where(valid[i], got.scores[m][0], torch.nan)
            secs[m] += got.meta["seconds"][m]
    meta = {**s.meta(), "test": "attributions", "methods": list(methods), "n_steps": n_steps,
            "n_samples": n_samples, "seed": seed, "seconds": secs,
            "baseline": "zero word embedding (Site.WORD_EMBED); positions, token types and "
                        "any embedding norm applied after it, as the model does",
            "site": site_meta(s.adapter),
            "scores": "signed; [batch, pos]; NaN on padding"}
    return TokenAttributions(scores, meta)


def token_attributions(model, task, metric=None, methods=METHODS, n_prompts=None,
                       seed: int = 0, n_steps: int = 32, n_samples: int = 200,
                       perturbations_per_eval: int = 16) -> TokenAttributions:
    """Input-token importance for the task's metric by each of ``methods`` (captum)."""
    s = prepare(model, task, metric, n_prompts, seed, eps=1.0)
    return attributions_from(s, methods, n_steps, n_samples, perturbations_per_eval, seed)


def occlusion(model, prompts, metric=None, n_prompts=None, perturbations_per_eval: int = 16
              ) -> TokenAttributions:
    """Blank-out importance: metric(x) - metric(x with token t's word embedding zeroed), for
    every real token of every prompt (``prompts``: a task name, Task or PromptSet)."""
    return token_attributions(model, prompts, metric, ("occlusion",), n_prompts,
                              perturbations_per_eval=perturbations_per_eval)
