"""How well attribution patching ranks heads against exact patching: rank correlations, the
share of the exactly strongest heads that AtP also puts on top, and the worst misses."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.types import HeadId
from ..stats.agreement import kendall, spearman

__all__ = ["AtPAgreement", "atp_agreement"]


@dataclass
class AtPAgreement:
    """AtP's head ranking against exact per-head effects.

    spearman, kendall: rank correlations of the two scores over heads (of |score| when
        ``absolute``; NaN with fewer than 3 heads or a constant side).
    recall: the share of the ``top`` heads with the largest exact effect that AtP also ranks
        in its own ``top``.
    misses: the ``top`` exactly strongest heads, worst AtP rank first; columns layer, head,
        exact, atp, exact_rank, atp_rank (rank 1 = strongest), rank_gap = atp_rank -
        exact_rank.
    overrated: the ``top`` heads AtP ranks highest, worst exact rank first (the same columns):
        heads whose first-order estimate is far above their exact effect (e.g. a backup head
        restores what patching one head removes, which no gradient at one run sees).
    meta: n_heads, top, absolute.
    """

    spearman: float
    kendall: float
    recall: float
    misses: pd.DataFrame
    overrated: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def worst(self) -> HeadId | None:
        """The exactly strong head AtP ranks lowest (None when there is none)."""
        if self.misses.empty:
            return None
        r = self.misses.iloc[0]
        return HeadId(int(r["layer"]), int(r["head"]))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"spearman": self.spearman, "kendall": self.kendall,
                              "recall_at_top": self.recall, **self.meta}])

    def summary(self) -> dict:
        """Plain numbers for an audit's meta."""
        worst = self.worst()
        return {"spearman": self.spearman, "kendall": self.kendall, "recall_at_top":
                self.recall, "top": self.meta.get("top"),
                "worst_miss": None if worst is None else str(worst),
                "worst_miss_atp_rank": None if worst is None else
                int(self.misses.iloc[0]["atp_rank"])}


def atp_agreement(
    atp: Float[Tensor, "*batch layer head"],
    exact: Float[Tensor, "*batch layer head"],
    *,
    top: int = 5,
    absolute: bool = True,
) -> AtPAgreement:
    """Agreement of AtP head scores with exact per-head effects.

    ``atp``: ``[layer, head]`` or per prompt ``[batch, layer, head]`` (e.g.
    ``atp(...).heads``); ``exact``: the same, e.g. ``Engine.run([ablate(h, "resample") for h in
    heads]).values - engine.clean`` reshaped to ``[batch, layer, head]`` (noising AtP estimates
    resample ablation). Per-prompt inputs are averaged over prompts first. ``absolute``: rank
    magnitudes (screening asks which heads matter, not in which direction)."""
    a, e = _mean(atp, "atp"), _mean(exact, "exact")
    if a.shape != e.shape:
        raise ValueError(f"atp and exact: expected one [layer, head] shape, got "
                         f"{tuple(a.shape)} and {tuple(e.shape)}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top: expected a positive integer, got {top!r}")
    ok = ~(torch.isnan(a) | torch.isnan(e)).flatten()
    fa, fe = a.flatten()[ok], e.flatten()[ok]
    ra, re_ = (fa.abs(), fe.abs()) if absolute else (fa, fe)
    k = min(top, int(ok.sum()))
    a_rank = _rank(ra)
    e_rank = _rank(re_)
    nh = a.shape[1]
    where = ok.nonzero()[:, 0]
    strong = e_rank.argsort()[:k]  # the k exactly strongest
    recall = float((a_rank[strong] <= k).double().mean()) if k else float("nan")
    def frame(items, first):
        rows = [{"layer": int(where[i]) // nh, "head": int(where[i]) % nh,
                 "exact": float(fe[i]), "atp": float(fa[i]), "exact_rank": int(e_rank[i]),
                 "atp_rank": int(a_rank[i])} for i in items.tolist()]
        f = pd.DataFrame(rows, columns=["layer", "head", "exact", "atp", "exact_rank",
                                        "atp_rank"])
        f["rank_gap"] = f["atp_rank"] - f["exact_rank"]
        asc = first == "atp_rank"
        f = f.sort_values(["rank_gap", first], ascending=[asc, True])
        return f.reset_index(drop=True)

    return AtPAgreement(
        spearman=float(spearman(ra, re_)), kendall=float(kendall(ra, re_)), recall=recall,
        misses=frame(strong, "exact_rank"), overrated=frame(a_rank.argsort()[:k], "atp_rank"),
        meta={"n_heads": int(ok.sum()), "top": k, "absolute": absolute})


def _mean(t, arg: str) -> Tensor:
    t = torch.as_tensor(t).detach().double().cpu()
    if t.ndim == 3:
        return t.nanmean(0)
    if t.ndim != 2:
        raise ValueError(f"{arg}: expected [layer, head] or [batch, layer, head], got shape "
                         f"{tuple(t.shape)}")
    return t


def _rank(x: Tensor) -> Tensor:
    """1 = largest; ties broken by position."""
    order = x.argsort(descending=True, stable=True)
    r = torch.empty_like(order)
    r[order] = torch.arange(1, len(x) + 1)
    return r
