"""What each head of the planted model really does (:mod:`lensattr.zoo.planted`): the verdict
an audit of ``planted-copy`` must give it under the primary (resample) baseline, and under
others where they differ, its claimed and carrying sources and its partner."""

from __future__ import annotations

from .planted_layout import A_B, A_D, A_F, A_G, A_P, A_Q

__all__ = ["PLANTED_TRUTH", "ALL_BASELINES"]

ALL_BASELINES = ["zero", "mean", "resample"]


def _head(
    layer,
    head,
    verdict,
    role,
    claimed,
    carrier,
    head_type=None,
    partner=None,
    compensated_under=(),
    note="",
    verdict_by_baseline=None,
):
    return {
        "layer": layer, "head": head, "role": role, "verdict": verdict, "head_type": head_type,
        "partner": partner, "compensated_under": list(compensated_under),
        "claimed_source_role": claimed, "carrier_role": carrier, "diffuse": role == "diffuse",
        "note": note, "verdict_by_baseline": dict(verdict_by_baseline or {}),
    }  # fmt: skip


# fmt: off
PLANTED_TRUTH: dict = {
    "model": "planted",
    "task": "planted-copy",
    "heads": [
        _head(0, 0, "faithful", "faithful", "S1", "S1",
              note="END attends S1 0.7 (BOS/fillers 0.3, zero value); writes 4 * U(A)"),
        _head(0, 1, "misleading", "decoy", "DECOY", "S1",
              note="END attends DECOY 0.82 whose value is zero; S1 (0.15 x gain 20) carries 3"),
        _head(0, 2, "inert", "sink", "BOS", None, head_type="sink",
              note="BOS >= 0.95 everywhere, never a name at END; nonzero W_O, no effect"),
        _head(0, 3, "compensated", "backup_primary", "S1", "S1", partner=[1, 0],
              compensated_under=ALL_BASELINES,
              note="END attends S1 0.9; writes 5 * U(A) and a tag T(A) that silences L1H0"),
        _head(0, 4, "faithful", "backup_primary_constant", "S1", "S1", partner=[1, 4],
              compensated_under=["zero"],
              note="END attends S1 0.9 (BOS 0.1); writes 4 * U(A) and, at every position, a "
              "constant tag K that silences L1H4. K is the same on every prompt, so resample "
              "and mean ablation keep L1H4 off (effect 4, routed through S1: faithful under "
              "the primary baseline); zero ablation switches L1H4 on (effect 1, compensated)"),
        _head(1, 0, "compensated", "backup_secondary", "BOS", "S1", partner=[0, 3],
              compensated_under=ALL_BASELINES,
              note="END attends BOS while L0H3's tag matches S1; without it attends S1 "
              "and restores ~5"),
        _head(1, 1, "inert", "previous_token", None, None, head_type="previous_token",
              note="attends the previous token 0.95 (END -> pos 5); writes junk J nobody reads"),
        _head(1, 2, "negligible", "diffuse", None, None,
              note="uniform attention over causal positions; writes junk J nobody reads"),
        _head(1, 3, "inert", "self", "END", None, head_type="self",
              note="attends itself 0.9, BOS 0.1; writes junk J nobody reads"),
        _head(1, 4, "inert", "backup_secondary_constant", "BOS", "S1", head_type="sink",
              partner=[0, 4], compensated_under=["zero"],
              note="END attends BOS (zero value) while L0H4's constant tag K is present: on "
              "clean prompts and under resample or mean ablation of L0H4 alike, so its effect "
              "is null there (inert under the primary baseline); when L0H4 is zero-ablated it "
              "attends S1 and restores 3 of 4 (compensated under zero, flagged)"),
        _head(0, 5, "inert", "sink_carrier", "S2", "BOS", head_type="self",
              verdict_by_baseline={"zero": "through_sink", "mean": "inert",
                                   "resample": "inert"},
              note="END attends BOS 0.7 (value: gate G) and S2 0.3 (value zero), other rows "
              "themselves; G keeps L1H5 off. Zero ablation (or removing the BOS edge) switches "
              "L1H5 on: -3/16, all of it through the sink's term (through_sink). BOS's value "
              "is the same on every prompt, so resample and mean ablation change nothing"),
        _head(0, 6, "inert", "constant_value", "S1", None, head_type="sink",
              verdict_by_baseline={"zero": "inert", "mean": "inert", "resample": "inert"},
              note="W_V = 0, b_V = e_0: writes b_V @ W_O = H at every position whatever it "
              "attends (END: S1 0.8, BOS 0.2). Zero ablation keeps b_V (the attention-"
              "independent part), so no edit of it moves the metric; zeroing hook_z outright "
              "(removing b_V too) would switch L1H5 on (-3/16)"),
        _head(1, 5, "inert", "gated_copier", None, None, head_type="sink",
              note="END attends BOS (zero value) while G and H are present, on clean and "
              "corrupted prompts alike; copies S1 (+3) when either gate is missing"),
        _head(1, 6, "negligible", "diffuse", None, None,
              note="uniform attention over causal positions; writes junk J nobody reads"),
    ],
    "contributions": {"faithful": A_F, "decoy": A_D, "backup": A_B,
                      "backup_constant": A_P, "backup_constant_restore": A_Q,
                      "gated_copy": A_G},
}
# fmt: on
