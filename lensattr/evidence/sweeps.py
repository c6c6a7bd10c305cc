"""Standard sweeps over heads: ablations, read-row splits, claimed-set edits, sink removal,
direct paths, single edges (removed, or their weights patched), read-row pattern patches and
joint ablations. Every edit takes the baseline its removed terms are replaced by, so all the
numbers behind one verdict share one baseline.

Each intervention is named by its :class:`~lensattr.evidence.keys.EvidenceKey` (kind, head,
baseline, source), the key the judgement looks its values up by; ``str(key)`` is the display
label (``kind:layer.head``). The engine keys its results by what each intervention does.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool
from torch import Tensor

from ..core.types import AblationMethod, HeadId
from .interventions import Intervention, ablate, patch_weights, remove_direct, remove_sources
from .keys import Kind, key

__all__ = [
    "ablation_sweep",
    "row_split_sweep",
    "claim_sweep",
    "sink_sweep",
    "direct_sweep",
    "edge_sweep",
    "pattern_sweep",
    "joint_sweep",
]

Z = AblationMethod.ZERO


def ablation_sweep(heads: list[HeadId], method: AblationMethod) -> list[Intervention]:
    return [ablate(h, method=method, label=key(Kind.ABLATE, h, baseline=method)) for h in heads]


def row_split_sweep(
    heads: list[HeadId], method: AblationMethod, read_rows: Bool[Tensor, "batch pos"]
) -> list[Intervention]:
    """Per head: ablate it at the metric's read rows only, and at every other row only. The
    two effects say where the head's effect lives."""
    out = []
    for h in heads:
        out.append(ablate(h, method=method, rows=read_rows,
                          label=key(Kind.READ, h, baseline=method)))
        out.append(ablate(h, method=method, rows=~read_rows,
                          label=key(Kind.OTHER, h, baseline=method)))
    return out


def claim_sweep(
    heads: list[HeadId],
    claimed: Bool[Tensor, "batch layer head_index query_pos key_pos"],
    allowed: Bool[Tensor, "batch query_pos key_pos"],
    sink: Bool[Tensor, "batch key_pos"],
    baseline: AblationMethod,
    *,
    remove: bool = True,
    read_rows: Bool[Tensor, "batch pos"] | None = None,
) -> list[Intervention]:
    """Per head, on the rows whose claim is non-empty: keep only the claimed set C (every
    source outside C removed, the sink's terms too, so what is kept is C alone) and, with
    ``remove``, remove C; under the zero baseline, remove C at the read rows and renormalise
    what is left there (the secondary, renormalised knockout of the claim the tables show).
    Removed terms are replaced by ``baseline``'s counterparts. ``sink`` is kept in the
    signature for callers; the sink's own share is measured by :func:`sink_sweep`."""
    del sink
    out = []
    for h in heads:
        c = claimed[:, h.layer, h.head] & allowed  # [batch, q, k]
        rows = c.any(-1, keepdim=True)  # the rows the claim is about
        keep = allowed & ~c & rows
        out.append(remove_sources(h, keep, baseline=baseline,
                                  label=key(Kind.KEEP, h, baseline=baseline)))
        if remove:
            out.append(remove_sources(h, c, baseline=baseline,
                                      label=key(Kind.REMOVE, h, baseline=baseline)))
        if baseline == Z:
            at = c if read_rows is None else c & read_rows[:, :, None]
            out.append(remove_sources(h, at, renormalise=True, label=key(Kind.RENORM, h)))
    return out


def sink_sweep(
    heads: list[HeadId],
    allowed: Bool[Tensor, "batch query_pos key_pos"],
    sink: Bool[Tensor, "batch key_pos"],
    baseline: AblationMethod,
) -> list[Intervention]:
    """Per head: remove the sink's terms at every row (replaced by the baseline's)."""
    s = allowed & sink[:, None, :]
    return [remove_sources(h, s, baseline=baseline, label=key(Kind.SINK, h, baseline=baseline))
            for h in heads]


def direct_sweep(heads: list[HeadId], baseline: AblationMethod) -> list[Intervention]:
    """Per head: replace its direct path to the readout by the baseline's output."""
    return [remove_direct(h, baseline=baseline, label=key(Kind.DIRECT, h, baseline=baseline))
            for h in heads]


def edge_sweep(
    heads: list[HeadId],
    read_rows: Bool[Tensor, "batch pos"],
    sources: list[Tensor],
    n_pos: int,
    baseline: AblationMethod = Z,
    kind: Kind = Kind.EDGE,
    weights_only: bool = False,
) -> list[Intervention]:
    """Per head and examined source: remove the edges (read rows -> source), replaced by the
    baseline's terms; with ``weights_only``, replace only their attention weights by the
    baseline's (pattern patching of those entries, the run's values kept). ``sources``: one
    [batch] tensor of source positions per examined source (-1 = absent in that prompt).
    Keys: ``(kind, head, baseline, source index)``; kind EDGE, PATTERN or LOCUS_EDGE."""
    n = read_rows.shape[0]
    rows = torch.arange(n)
    out = []
    for j, src in enumerate(sources):
        mask = torch.zeros(n, n_pos, n_pos, dtype=torch.bool)
        ok = src >= 0
        mask[rows[ok], :, src[ok]] = True
        mask &= read_rows[:, :, None]
        for h in heads:
            name = key(kind, h, baseline=baseline, source=j)
            out.append(patch_weights(h, mask, baseline=baseline, label=name) if weights_only
                       else remove_sources(h, mask, baseline=baseline, label=name))
    return out


def pattern_sweep(
    heads: list[HeadId],
    allowed: Bool[Tensor, "batch query_pos key_pos"],
    read_rows: Bool[Tensor, "batch pos"],
    baseline: AblationMethod,
) -> list[Intervention]:
    """Per head: replace its whole attention row at the read rows by the baseline's (weights
    only, the run's values kept): how much of the head's effect there comes from *where* it
    looks. Key kind: PATTERN_READ."""
    at = allowed & read_rows[:, :, None]
    return [patch_weights(h, at, baseline=baseline,
                          label=key(Kind.PATTERN_READ, h, baseline=baseline)) for h in heads]


def joint_sweep(pairs: list[tuple[HeadId, HeadId]], method: AblationMethod) -> list[Intervention]:
    return [
        ablate(a, b, method=method, label=key(Kind.JOINT, a, b, baseline=method))
        for a, b in pairs
    ]
