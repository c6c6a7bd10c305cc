"""Token importance: which input tokens the metric depends on, claimed and measured.

Claims (from one clean run's attention patterns), each a distribution over input positions at
the metric's read rows (averaged over them):

* ``attention``: the last layer's attention, averaged over heads (raw attention);
* ``rollout`` and ``flow`` (Abnar & Zuidema 2020), see :mod:`lensattr.claim_sources`.

Causal evidence: **occlusion** of one input token at its word embedding (``Site.WORD_EMBED``,
the embedding module's own output). Position and token-type embeddings are kept: they are added,
and an embedding LayerNorm (BERT) applied, after the edit, as the model does. On GPT-2 / Llama
that site is the hook ``Site.EMBED`` reads; on BERT bridges ``Site.EMBED`` is the post-LayerNorm
sum of word, position and token-type embeddings, so zeroing it would remove those as well.
``occlusion_zero``: the word embedding replaced by zeros; ``occlusion_corrupted``: by the
corrupted prompt's word embedding at the same position (where the prompts have corrupted
versions with the same padding; NaN else).
Both are the raw metric change ``m(occluded) - m0`` per prompt: one forward per (prompt,
position), batched. The comparison is Abnar & Zuidema's: per layer, Spearman (and Kendall) of
each claim with |occlusion| over the positions of one prompt, averaged over prompts, with
bootstrap CIs over prompts (:func:`~lensattr.compare.agreement.rank_agreement`,
``how="per_prompt"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..claims.sources import at_rows, layer_claims
from ..core.distributed import shared
from ..core.metric import check_metric_output
from ..core.metrics import as_metric
from ..core.prompts import PromptSet
from ..core.sites import Site, hook_name, same_hook
from ..models.adapter import Adapter
from ..stats.agreement import rank_agreement

__all__ = ["TokenImportance", "token_importance", "occlusion", "REPLACE", "SITE", "site_meta"]

REPLACE = ("zero", "corrupted")
SITE = Site.WORD_EMBED  # where a token is occluded: its word embedding alone
PerLayer = Float[Tensor, "batch layer pos"]


@dataclass
class TokenImportance:
    """Per-token claims and evidence. Axes: batch (prompt), layer, pos (input position).

    ``claims[name]``: ``[batch, layer, pos]`` (``attention``: layer l's head-averaged pattern;
    ``rollout`` / ``flow``: up to and including layer l), at the read rows; NaN at padding.
    ``occlusion[replace]``: ``[batch, pos]`` metric change when that token is occluded.
    """

    claims: dict[str, PerLayer]
    occlusion: dict[str, Float[Tensor, "batch pos"]]
    tokens: Tensor
    valid: Tensor
    roles: dict[str, Tensor]
    meta: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per (prompt, real input position): its token id and role, each claim at the
        last layer, and each occlusion's metric change."""
        b_idx, pos = self.valid.nonzero(as_tuple=True)
        roles = {(int(b), int(p)): k for k, v in self.roles.items() for b, p in enumerate(v)}
        df = pd.DataFrame({
            "prompt": b_idx.numpy(), "pos": pos.numpy(),
            "token": self.tokens[b_idx, pos].numpy(),
            "role": [roles.get((int(b), int(p)), "") for b, p in zip(b_idx, pos, strict=True)],
        })
        for name, x in self.claims.items():
            df[name] = x[b_idx, -1, pos].numpy().astype(float)
        for name, x in self.occlusion.items():
            df[f"occlusion_{name}"] = x[b_idx, pos].numpy().astype(float)
        return df

    def agreement(self, seed: int = 0, n_boot: int = 500, evidence=("zero",)) -> pd.DataFrame:
        """Per layer, rank agreement of every claim with |occlusion| of each kind in
        ``evidence`` (items: the real positions of one prompt; ``how="per_prompt"``). Rows:
        claim, evidence, layer, rho, CIs. The default leaves ``corrupted`` out: corrupted
        prompts differ from the clean ones at one or two positions, so that occlusion is
        exactly 0 everywhere else and a rank correlation over those ties means nothing."""
        bad = [e for e in evidence if e not in self.occlusion]
        if bad:
            raise ValueError(f"evidence: no occlusion {bad}; expected some of "
                             f"{list(self.occlusion)}")
        frames = []
        for ev in evidence:
            occ = self.occlusion[ev]
            if torch.isnan(occ).all():
                continue
            for name, x in self.claims.items():
                e = occ.abs()[:, None].expand_as(x)
                df = rank_agreement(x, e, layer_dim=1, how="per_prompt", seed=seed, n_boot=n_boot)
                df = df[df["layer"].notna()]  # pooling layers' items within a prompt means nothing
                df.insert(1, "claim", name)
                df.insert(2, "evidence", f"|occlusion ({ev})|")
                frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def occlusion(model, prompts: PromptSet, metric, replace: str = "zero", batch_size: int = 64
              ) -> Float[Tensor, "batch pos"]:
    """``m(token at p occluded) - m0`` for every prompt and real position p (NaN at padding):
    the word embedding at p (``Site.WORD_EMBED``; positions, token types and any embedding norm
    applied after it) replaced by zeros (``"zero"``) or by the corrupted prompt's word embedding
    there (``"corrupted"``; positions where the corrupted token is the clean one are exactly 0
    and not run). One forward per (prompt, position), ``batch_size`` rows at a time."""
    if replace not in REPLACE:
        raise ValueError(f"replace: expected one of {REPLACE}, got {replace!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    metric = as_metric(metric)
    mask = prompts.attention_mask
    readout = metric.readout(prompts)
    clean_vals = adapter.read(prompts.tokens, mask, readout)
    clean = _compute(metric, clean_vals, prompts, clean_vals)
    emb = None
    if replace == "corrupted":
        if prompts.corrupted is None:
            raise ValueError('replace: "corrupted" needs prompts with corrupted versions')
        cm = prompts.corrupted_attention_mask
        if (cm is None) != (mask is None) or (cm is not None and mask is not None
                                               and not torch.equal(cm, mask)):
            raise ValueError('replace: "corrupted" needs corrupted prompts with the same padding')
        st = adapter.cache(prompts.corrupted, cm, sites=(SITE,))
        emb = st[(SITE, None)]  # [batch, pos, d_model]
    out = torch.full(prompts.tokens.shape, math.nan)
    todo = prompts.valid
    if emb is not None:  # the same token at p: replacing its embedding by itself changes nothing
        same = prompts.valid & (prompts.corrupted == prompts.tokens)
        out[same] = 0.0
        todo = todo & ~same
    chunks = todo.nonzero().split(batch_size)

    def run(c: int) -> Tensor:  # one chunk's metric changes [rows] (CPU)
        bi, pi = chunks[c][:, 0], chunks[c][:, 1]
        sub = prompts.take(bi)

        def hook(x):  # [rows, pos, d_model]
            x = x.clone()
            rows = torch.arange(x.shape[0], device=x.device)
            p = pi.to(x.device)
            x[rows, p] = 0.0 if emb is None else emb[bi.to(emb.device), p].to(x)
            return x

        vals = adapter.read(sub.tokens, sub.attention_mask, readout.take(bi),
                            {(SITE, None): hook})
        return _compute(metric, vals, sub, clean_vals[bi.to(clean_vals.device)]) - clean[bi]

    # chunks are shared by the ranks of a process group, if any (one rank: all run here)
    for c, change in enumerate(shared(len(chunks), run, f"occlusion ({replace})")):
        out[chunks[c][:, 0], chunks[c][:, 1]] = change
    return out


def site_meta(adapter: Adapter) -> dict:
    """Where occlusion acts on this model, for a result's ``meta``."""
    return {"site": SITE.value, "hook": hook_name(SITE),
            "same_as_embed": same_hook(adapter, SITE, Site.EMBED)}


def _compute(metric, values: Tensor, prompts: PromptSet, clean: Tensor) -> Tensor:
    out = metric.compute(values.float(), prompts, clean.float())
    return check_metric_output(out, len(prompts), metric.name).detach().cpu()


def token_importance(
    model,
    prompts: PromptSet,
    metric,
    claims=("raw", "rollout", "flow"),
    patterns: Tensor | None = None,
    read_rows: Tensor | None = None,
    layered: dict[str, Tensor] | None = None,
    batch_size: int = 64,
) -> TokenImportance:
    """Token importance claims (raw attention and those of ``rollout``/``flow`` in ``claims``)
    and occlusion evidence for ``prompts`` under ``metric``.

    ``patterns`` ([batch, layer, head, q, k]), ``read_rows`` ([batch, pos] bool) and
    ``layered`` (rollout/flow from :func:`~lensattr.claim_sources.layer_claims`) can be handed
    in from an audit's clean run; they are computed here otherwise (one forward pass)."""
    from ..claims.sources import resolve_claims
    from ..core.metrics import read_rows as metric_rows

    adapter = model if isinstance(model, Adapter) else Adapter(model)
    metric = as_metric(metric)
    sources = resolve_claims(claims, adapter.n_layers)
    if patterns is None:
        st = adapter.cache(prompts.tokens, prompts.attention_mask,
                           sites=(Site.PATTERN,))
        patterns = torch.stack([st[(Site.PATTERN, li)].float().cpu()
                                for li in range(adapter.n_layers)], 1)
    rows = metric_rows(metric, prompts) if read_rows is None else read_rows
    if layered is None:
        layered = layer_claims(patterns, prompts, rows, adapter.is_causal, sources)
    valid = prompts.valid
    pad = ~valid[:, None, :]  # [b, 1, pos]

    def per_layer(x: Tensor) -> Tensor:  # [b, L, q, k] -> [b, L, k] at the read rows (mean)
        return torch.stack([at_rows(x[:, li], rows, mean=True)
                            for li in range(x.shape[1])], 1).masked_fill(pad, math.nan)

    out_claims = {"attention": per_layer(patterns.float().mean(2))}
    out_claims.update({k: per_layer(layered[k]) for k in ("rollout", "flow") if k in layered})
    occ = {"zero": occlusion(adapter, prompts, metric, "zero", batch_size)}
    same_pad = prompts.corrupted is not None and (
        (prompts.attention_mask is None and prompts.corrupted_attention_mask is None)
        or (prompts.attention_mask is not None and prompts.corrupted_attention_mask is not None
            and torch.equal(prompts.attention_mask, prompts.corrupted_attention_mask)))
    occ["corrupted"] = (occlusion(adapter, prompts, metric, "corrupted", batch_size) if same_pad
                        else torch.full(prompts.tokens.shape, math.nan))
    meta = {"claims": list(out_claims), "attention": "last layer, head-averaged, read rows",
            "rollout_flow": "0.5 I + 0.5 A, rows renormalised; up to and including each layer",
            "occlusion": "word embedding (Site.WORD_EMBED) at one position replaced, positions "
                         "/ token types added and any embedding norm applied after it; raw "
                         "metric change m(occluded) - m0",
            "occlusion_site": site_meta(adapter),
            "occlusion_corrupted": "computed" if same_pad else
            "NaN: no corrupted prompts with the same padding"}
    return TokenImportance(out_claims, occ, prompts.tokens.cpu(), valid.cpu(),
                           {k: v.cpu() for k, v in prompts.roles.items()}, meta)
