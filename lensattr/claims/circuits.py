"""Weight-based claims that need no prompts: QK and OV circuits, composition scores between
heads, OV copying scores.

These reuse TransformerLens on the bridge (checked in 4.3): ``model.QK`` / ``model.OV`` are
``FactoredMatrix`` objects (low rank, never multiplied out; key/value heads are repeated under
grouped-query attention) and ``model.all_composition_scores(mode)`` works on a
``TransformerBridge``. Like TL's, they read the raw weights: norms (LayerNorm/RMSNorm scales)
and MLPs between heads are ignored, which is what makes them prompt-free.

* Composition score of an earlier head A into a later head B (Elhage et al. 2021):
  ``||W_OV^A M^B||_F / (||W_OV^A||_F ||M^B||_F)`` with ``M^B = W_QK^B`` (Q), ``(W_QK^B)^T`` (K)
  or ``W_OV^B`` (V); defined only for layer(A) < layer(B) (NaN elsewhere, where TL puts 0).
* Copying score (Elhage et al. 2021): of the full OV circuit ``W_E W_OV W_U``,
  ``sum(eigenvalues).real / sum(|eigenvalues|)`` (1 = a pure copying head, -1 = pure
  suppression); the eigenvalues come from the small ``d_head x d_head`` product.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..models.adapter import Adapter, ModelError

__all__ = ["Circuits", "head_circuits", "CompositionScores", "composition_scores",
           "copying_scores"]

MODES = ("Q", "K", "V")


@dataclass
class Circuits:
    """Per-head circuits as TransformerLens ``FactoredMatrix`` objects [layer, head, d_model,
    d_model]: ``QK`` (query side on the left) and ``OV`` (``x @ OV`` is what a source writes);
    ``qk_norm`` / ``ov_norm``: their Frobenius norms [layer, head]."""

    QK: object
    OV: object
    qk_norm: Float[Tensor, "layer head_index"]
    ov_norm: Float[Tensor, "layer head_index"]
    meta: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        n_l, n_h = self.qk_norm.shape
        return pd.DataFrame({
            "layer": [li for li in range(n_l) for _ in range(n_h)],
            "head": [h for _ in range(n_l) for h in range(n_h)],
            "qk_norm": self.qk_norm.reshape(-1).numpy(),
            "ov_norm": self.ov_norm.reshape(-1).numpy(),
        })  # fmt: skip


def head_circuits(model) -> Circuits:
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    with torch.no_grad():
        QK, OV = adapter.circuits()
        return Circuits(QK=QK, OV=OV, qk_norm=QK.norm().detach().float().cpu(),
                        ov_norm=OV.norm().detach().float().cpu(),
                        meta={"model": adapter.name, "method": "circuits"})


@dataclass
class CompositionScores:
    """``scores[mode][l1, h1, l2, h2]``: how much head (l1, h1)'s output is read by head
    (l2, h2)'s query (Q), key (K) or value (V) side; NaN unless l1 < l2."""

    scores: dict[str, Float[Tensor, "layer head_index layer2 head_index2"]]
    meta: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per (source head, reader head) pair with l1 < l2, a column per mode."""
        s = next(iter(self.scores.values()))
        n_l, n_h = s.shape[:2]
        idx = torch.cartesian_prod(*(torch.arange(n) for n in (n_l, n_h, n_l, n_h)))
        keep = idx[:, 0] < idx[:, 2]
        idx = idx[keep]
        cols = {"layer": idx[:, 0], "head": idx[:, 1], "reader_layer": idx[:, 2],
                "reader_head": idx[:, 3]}
        frame = pd.DataFrame({k: v.numpy() for k, v in cols.items()})
        for mode, t in self.scores.items():
            frame[f"{mode.lower()}_composition"] = t.reshape(-1)[keep].numpy()
        return frame


def composition_scores(model, modes: tuple[str, ...] = MODES) -> CompositionScores:
    """TransformerLens's ``all_composition_scores`` for each mode, with the pairs it leaves
    undefined (reader not in a later layer) set to NaN."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"modes: expected some of {MODES}, got {bad}")
    n_l = adapter.n_layers
    later = torch.arange(n_l)[:, None, None, None] < torch.arange(n_l)[None, None, :, None]
    out = {}
    with torch.no_grad():
        for m in modes:
            s = adapter.composition_scores(m).float().cpu()
            out[m] = torch.where(later, s, torch.nan)
    return CompositionScores(out, meta={"model": adapter.name, "method": "composition_scores",
                                        "modes": list(modes)})


def copying_scores(model) -> Float[Tensor, "layer head_index"]:
    """Copying score per head from the eigenvalues of ``W_E W_OV W_U`` (see module doc)."""
    adapter = model if isinstance(model, Adapter) else Adapter(model)
    if not adapter.logits_meaningful:
        raise ModelError(
            f"copying_scores: model {adapter.name!r} has no trained unembedding (its logits mean "
            "nothing), so W_E W_OV W_U has no meaning"
        )
    with torch.no_grad():
        _, OV = adapter.circuits()
        W_E, W_U = adapter.embed_unembed()
        full = W_E @ OV @ W_U  # FactoredMatrix [layer, head, d_vocab, d_vocab]
        ev = full.eigenvalues  # [layer, head, d_head] complex
        return (ev.sum(-1).real / ev.abs().sum(-1)).float().cpu()
