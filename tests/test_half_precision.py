"""Models in half precision and placed by a device map: bf16 / fp16 audits run on the hook-free
path and give float32's verdicts (metrics accumulated in float32); ``load_model``'s dtype and
placement arguments are checked; a model spread over devices is refused with a clear error."""

from __future__ import annotations

import warnings

import pytest
import torch

import lensattr
from lensattr.evidence import Engine
from lensattr.models.errors import ModelError


def _audit(model_name: str, task: str, dtype: str | None):
    model = lensattr.load_model(model_name, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lensattr.audit(model, task, progress=False)


def _largest_effect_diff(a, b) -> float:
    """Over the effect columns, but the joint ones: which pair a joint ablation measures is
    chosen from the head deltas, where float32 rounding noise can name a partner that half
    precision (exactly 0) does not."""
    cols = [c for c in a.heads.columns if "effect" in c and not c.endswith("_level")
            and not c.startswith("joint_") and a.heads[c].dtype.kind == "f"]
    return max(float((a.heads[c] - b.heads[c]).abs().max()) for c in cols)


@pytest.mark.parametrize("model_name,task", [("planted", "planted-copy"),
                                             ("attn2", "previous-token")])
def test_half_precision_audit_gives_float32_verdicts(model_name, task):
    ref = _audit(model_name, task, None)
    assert ref.meta["engine"]["dtype"] == "float32"
    for dtype in ("bfloat16", "float16"):
        half = _audit(model_name, task, dtype)
        engine = half.meta["engine"]
        assert engine["dtype"] == dtype
        assert engine["path"] == "hook-free", engine["why_not_hook_free"]
        assert half.heads["verdict"].tolist() == ref.heads["verdict"].tolist()
        diff = _largest_effect_diff(ref, half)
        print(f"{model_name} {task} {dtype}: largest |effect diff| {diff:.4f}")
        assert 0 < diff < 0.05  # rounding, not another result (and not float32 in disguise)
        for name, t in half.tensors.items():
            if t.is_floating_point():
                assert t.dtype == torch.float32, name  # metrics accumulated in float32


def test_load_model_checks_dtype_and_placement():
    with pytest.raises(ModelError, match="dtype: expected one of float32, bfloat16"):
        lensattr.load_model("planted", dtype="int8")
    with pytest.raises(ModelError, match="n_devices: expected a positive integer"):
        lensattr.load_model("planted", n_devices=0)
    with pytest.raises(ModelError, match="mutually exclusive"):
        lensattr.load_model("planted", device="cpu", device_map="auto")
    with pytest.raises(ModelError, match="max_memory: expected a dict"):
        lensattr.load_model("planted", device_map="auto", max_memory="20GiB")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="n_devices=2 requires CUDA"):
            lensattr.load_model("planted", n_devices=2)


def test_device_map_on_one_device_matches_device():
    """An accelerate device map that keeps every layer on the CPU boots through the placement
    path (the bridge reads hf_device_map) and gives the same numbers as ``device="cpu"``."""
    placed = lensattr.load_model("planted", device_map="auto")
    assert placed.original_model.hf_device_map  # accelerate placed it
    plain = lensattr.load_model("planted", device="cpu")
    task = lensattr.tasks.get("planted-copy")
    prompts = task.prompts(n_prompts=8, model=plain)
    a = lensattr.activation_patching(placed, prompts, task.metric())
    b = lensattr.activation_patching(plain, prompts, task.metric())
    assert torch.equal(a.values, b.values)


def test_model_spread_over_devices_is_refused():
    model = lensattr.load_model("planted")
    task = lensattr.tasks.get("planted-copy")
    prompts = task.prompts(n_prompts=4, model=model)
    head = model.original_model.lm_head  # a second device, as a map over two GPUs makes
    head.weight = torch.nn.Parameter(head.weight.detach().to("meta"), requires_grad=False)
    with pytest.raises(ModelError, match=r"spread over cpu, meta .*torchrun"):
        Engine(model, prompts, task.metric(), progress=False)
    with pytest.raises(ModelError, match="patching needs the model on one device"):
        lensattr.activation_patching(model, prompts, task.metric())


def test_bfloat16_rounding_never_gives_another_confident_label():
    """On attn2's duplicate-token task bf16's rounding widens L0H0's interval past the
    equivalence test (float32: inert): the label it loses becomes undetermined, never another
    confident one."""
    ref = _audit("attn2", "duplicate-token", None)
    half = _audit("attn2", "duplicate-token", "bfloat16")
    moved = ref.heads["verdict"] != half.heads["verdict"]
    assert set(half.heads.loc[moved, "verdict"]) <= {"undetermined"}
    width = half.heads["effect_selected_hi"] - half.heads["effect_selected_lo"]
    ref_width = ref.heads["effect_selected_hi"] - ref.heads["effect_selected_lo"]
    assert (width[moved] > ref_width[moved]).all()  # rounding noise, more uncertainty


def test_cli_dtype_flag(tmp_path, capsys):
    from lensattr.cli.main import main

    assert main(["audit", "--quiet", "--dtype", "int8", "--out", str(tmp_path / "x")]) == 2
    assert "--dtype: expected one of float32, bfloat16, float16, got 'int8'" in (
        capsys.readouterr().err)
    out = tmp_path / "bf16"
    assert main(["audit", "--quiet", "--dtype", "bfloat16", "--out", str(out)]) == 0
    meta = lensattr.Audit.load(out).meta["engine"]
    assert meta["dtype"] == "bfloat16" and meta["path"] == "hook-free"
