"""Devices and dtypes (issue 12, item 11): the engine makes its tensors on the model's device and
hands results back on the CPU; an audit on CUDA equals the CPU one; meta records both."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lensattr
from lensattr.core.metrics import AnswerLogProb, KLToClean, LogitDiff
from lensattr.core.types import HeadId
from lensattr.evidence import Engine, ablate, keep_only, remove_direct, remove_sources
from lensattr.models.loading import boot_bridge

from .conftest import word_tokenizer

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: the CPU-vs-CUDA equality tests of the engine and the audit "
    "run only on a machine with a GPU",
)
FACTORIES = {"zeros", "ones", "full", "empty", "arange", "tensor", "eye", "linspace", "rand",
             "randn", "randint", "as_tensor"}
ROOT = Path(lensattr.__file__).parent
# the engine, the adapter and the metrics: each split into several modules by issue 18
SCANNED = ("evidence/engine.py", "evidence/chunk_plan.py", "evidence/chunk_forward.py",
           "evidence/metric_rows.py", "evidence/engine_result.py", "evidence/hooks.py",
           "models/adapter.py", "models/readout.py", "models/weights.py", "models/identity.py",
           "models/blocks.py", "core/metrics.py", "core/metric.py")
# tiny prompt sets: the audits here check numbers, not verdicts
pytestmark = pytest.mark.filterwarnings("ignore:Too few prompts")


def tiny_gpt2(device: str = "cpu", dtype=torch.float32):
    torch.manual_seed(0)  # the same weights as the session's random_gpt2
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    hf = GPT2LMHeadModel(cfg).to(dtype)
    return boot_bridge(hf, word_tokenizer(50), "random-gpt2", device=device)


def sweep(prompts):
    n, p = prompts.tokens.shape
    g = torch.Generator().manual_seed(11)
    S = torch.rand(n, p, p, generator=g) < 0.4
    heads = [HeadId(0, 1), HeadId(1, 2)]
    ivs = [ablate(h, method=m) for h in heads for m in ("zero", "mean", "resample")]
    ivs += [remove_sources(h, S, label=f"r{h}") for h in heads]
    ivs += [remove_sources(h, S, renormalise=True, label=f"n{h}") for h in heads]
    ivs += [keep_only(heads[1], torch.eye(p, dtype=torch.bool).expand(n, p, p), label="k")]
    ivs += [remove_direct(heads[0]), ablate(*heads, method="mean", label="joint")]
    # replacement baselines, direct baselines and position-limited ablations
    ivs += [remove_sources(h, S, baseline=b, label=f"{b}{h}") for h in heads
            for b in ("mean", "resample")]
    ivs += [remove_direct(heads[0], baseline=b, label=f"direct-{b}") for b in ("mean", "resample")]
    rows = torch.zeros(n, p, dtype=torch.bool)
    rows[:, -1] = True
    ivs += [ablate(heads[1], method="resample", rows=rows, label="read-row")]
    return ivs


def test_engine_factories_name_a_device():
    """Every tensor the engine, the adapter and the metrics create names its device (the
    model's, or the CPU on purpose): a tensor made on the default device is what broke the
    engine on CUDA models. Checked on the source, so it holds without a GPU."""
    bad = []
    for rel in SCANNED:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in FACTORIES
                    and not any(k.arg == "device" for k in node.keywords)):
                bad.append(f"{rel}:{node.lineno} torch.{node.func.attr}")
    assert not bad, "tensor factories without device=: " + ", ".join(bad)


def test_float64_model_equals_float32(random_gpt2, random_prompts):
    ivs = sweep(random_prompts)
    ref = Engine(random_gpt2, random_prompts, LogitDiff(), progress=False).run(
        ivs, track_heads=True)
    m64 = tiny_gpt2(dtype=torch.float64)
    res = Engine(m64, random_prompts, LogitDiff(), progress=False).run(ivs, track_heads=True)
    torch.testing.assert_close(res.values, ref.values, atol=1e-4, rtol=0, equal_nan=True)
    torch.testing.assert_close(res.head_delta, ref.head_delta, atol=1e-4, rtol=0)
    assert res.values.device.type == "cpu" and res.head_delta.device.type == "cpu"


def test_meta_records_dtype_and_device(random_gpt2, random_prompts):
    r = lensattr.audit(random_gpt2, random_prompts, LogitDiff(), progress=False, n_boot=50)
    assert r.meta["dtype"] == "float32" and r.meta["device"] == "cpu"


# ---- CUDA ----------------------------------------------------------------------------------
@CUDA
@pytest.mark.parametrize("metric", [LogitDiff, AnswerLogProb, KLToClean])
def test_engine_on_cuda_equals_cpu(random_gpt2, random_prompts, metric):
    ivs = sweep(random_prompts)
    cpu = Engine(random_gpt2, random_prompts, metric(), progress=False)
    gpu = Engine(tiny_gpt2("cuda"), random_prompts, metric(), progress=False)
    assert gpu.device.type == "cuda" and gpu.run_key == cpu.run_key  # device is not identity
    rc, rg = cpu.run(ivs, track_heads=True), gpu.run(ivs, track_heads=True)
    assert rg.values.device.type == "cpu" and rg.head_delta.device.type == "cpu"
    torch.testing.assert_close(rg.values, rc.values, atol=1e-4, rtol=0, equal_nan=True)
    torch.testing.assert_close(rg.head_delta, rc.head_delta, atol=1e-4, rtol=0)
    torch.testing.assert_close(gpu.clean, cpu.clean, atol=1e-4, rtol=0)


@CUDA
def test_edge_edits_through_z_on_cuda(random_gpt2, random_prompts):
    """The hook_z route for models whose pattern edits are discarded (e.g. BERT), on CUDA."""
    ivs = sweep(random_prompts)
    model = tiny_gpt2("cuda")
    ref = Engine(model, random_prompts, LogitDiff(), progress=False).run(ivs)
    lensattr.Adapter(model)._probes["pattern_editable"] = False  # this model's probe: no restore
    via_z = Engine(model, random_prompts, LogitDiff(), progress=False).run(ivs)
    torch.testing.assert_close(via_z.values, ref.values, atol=1e-4, rtol=0, equal_nan=True)


@CUDA
def test_audit_on_cuda_equals_cpu(random_gpt2, random_prompts):
    kw = dict(progress=False, n_boot=100, max_edge_sources=4)
    cpu = lensattr.audit(random_gpt2, random_prompts, LogitDiff(), **kw)
    gpu = lensattr.audit(tiny_gpt2("cuda"), random_prompts, LogitDiff(), **kw)
    assert gpu.meta["device"].startswith("cuda") and gpu.meta["dtype"] == "float32"
    assert gpu.meta["model_weights_hash"] == cpu.meta["model_weights_hash"]
    for table in ("heads", "edges"):
        a, b = getattr(cpu, table), getattr(gpu, table)
        assert list(a.columns) == list(b.columns) and len(a) == len(b)
        for col in a.columns:
            if a[col].dtype.kind == "f":
                np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), atol=1e-4,
                                           rtol=0, err_msg=f"{table}.{col}")
    for k, v in cpu.tensors.items():
        assert gpu.tensors[k].device.type == "cpu"
        torch.testing.assert_close(gpu.tensors[k].float(), v.float(), atol=1e-4, rtol=0,
                                   equal_nan=True)
