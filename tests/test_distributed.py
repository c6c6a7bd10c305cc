"""Work shared by torch.distributed ranks: two gloo ranks give bit-identical results to one
process (CLI audit and patch, the Python API under an initialised group); a rank killed
mid-run is named and a rerun with another world size resumes from every rank's checkpoint."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lensattr
import lensattr.core.distributed as distributed
from lensattr.core.distributed import RankFailure, World, _failure, assign, exchange, shared
from lensattr.core.metrics import LogitDiff
from lensattr.evidence import Engine, ablate
from lensattr.evidence.checkpoint import EvidenceStore, checkpoint_files, rank_file
from lensattr.models.adapter import Adapter

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SAME = ("heads.csv", "edges.csv", "tokens.csv", "tensors.safetensors", "verdicts.json")
RUN_KEYS = {"threads", "world_size", "backend"}  # how a run was done, not what it found


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _strip(x, skip: set):
    if isinstance(x, dict):
        return {k: _strip(v, skip) for k, v in x.items()
                if k not in skip and "seconds" not in k}
    if isinstance(x, list):
        return [_strip(v, skip) for v in x]
    return x


def assert_same_audit(a: Path, b: Path, resumed: bool = False) -> None:
    """Bit-identical outputs; ``audit.json`` apart from run times and how the run was done
    (and, for a resumed run, the forward work and rows it had left to do)."""
    for f in SAME:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs"
    skip = RUN_KEYS | ({"forward_work", "rows"} if resumed else set())
    ja, jb = (_strip(json.loads((d / "audit.json").read_text()), skip) for d in (a, b))
    assert ja == jb


def _torchrun(*args: str, **kw) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "lensattr", *args]


AUDIT = ("audit", "--quiet", "--threads", "1", "--n-prompts", "40")


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> Path:
    """The planted audit (40 prompts) of one process: the reference."""
    out = tmp_path_factory.mktemp("alone")
    subprocess.run([PY, "-m", "lensattr", *AUDIT, "--out", str(out)], check=True, env=_env(),
                   capture_output=True)
    return out


# ---- the pieces ------------------------------------------------------------------------------
def test_assign_is_deterministic_and_balanced():
    rng = random.Random(0)
    for size in (1, 2, 3, 5):
        costs = [rng.choice([1.0, 2.0, 7.5, 30.0]) for _ in range(101)]
        owners = assign(costs, size)
        assert owners == assign(list(costs), size)  # the same on every rank
        assert set(owners) <= set(range(size))
        load = [sum(c for c, r in zip(costs, owners, strict=True) if r == k)
                for k in range(size)]
        assert max(load) - min(load) <= max(costs)  # greedy, costliest first
    assert assign([], 2) == []
    with pytest.raises(ValueError, match="size: expected a positive number"):
        assign([1.0], 0)


def test_alone_nothing_is_shared():
    assert not distributed.world().sharded
    assert exchange({"a": 1}, "x") == [{"a": 1}]
    assert shared(3, lambda i: i * i, "squares") == [0, 1, 4]


def test_failure_names_the_rank_that_stopped():
    err = RuntimeError("[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 1800000 ms")
    f = _failure(World(0, 4, "gloo"), err, "the results of 12 interventions", "rerun")
    assert isinstance(f, RankFailure) and f.ranks == [1, 3]
    assert "rank 0 of 4: ranks 1, 3 stopped" in str(f) and "rerun" in str(f)
    gone = RuntimeError("Connection closed by peer [127.0.0.1]:1234")
    assert _failure(World(2, 4, "gloo"), gone, "x", "").ranks == [0]  # others see rank 0


def test_rank_files_are_read_whatever_world_size_wrote_them(tmp_path):
    base = tmp_path / "ev.ckpt.safetensors"
    assert rank_file(base, 0) == base
    assert rank_file(base, 3) == tmp_path / "ev.ckpt.rank3.safetensors"
    parts = {"config": "c", "weights": "w", "prompts": "p", "metric": "m", "engine": "e"}
    for rank in (0, 1, 2):  # a run of three ranks, each saving its own
        s = EvidenceStore(parts, base, rank=rank)
        s.put(f"iv{rank}", torch.full((4,), float(rank)))
        s.save()
    (tmp_path / "ev.ckpt.rank1.safetensors.tmp").write_bytes(b"")  # not a rank file
    assert [p.name for p in checkpoint_files(base)] == [
        "ev.ckpt.safetensors", "ev.ckpt.rank1.safetensors", "ev.ckpt.rank2.safetensors"]
    two = EvidenceStore(parts, base, rank=1)  # rerun with two ranks: rank 1 sees all three
    assert len(two) == 3 and two.get("iv2", False)[0].eq(2.0).all()
    two.put("new", torch.zeros(4))
    two.save()  # writes only what its own file held, and the new one
    own = load_file(str(rank_file(base, 1)))
    assert sorted(k.split("/")[-1] for k in own) == ["iv1", "new"]


def test_resumed_engine_is_bit_identical(tmp_path):
    """Chunks are planned from the work list, not from what the checkpoint holds: a resumed
    run computes every intervention in the same company, so bit for bit the same numbers."""
    model = lensattr.load_model("planted")
    prompts = lensattr.tasks.get("planted-copy").prompts(n_prompts=12, model=model)
    ivs = [ablate(h, method=m) for m in ("zero", "mean") for h in model_heads(model)]
    full = Engine(model, prompts, LogitDiff(), batch_size=36, progress=False).run(ivs)
    ck = tmp_path / "ev.safetensors"
    first = Engine(model, prompts, LogitDiff(), batch_size=36, progress=False, checkpoint=ck)
    inner, calls = first._run_chunk, []

    def interrupted(chunk, track):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(len(chunk))
        return inner(chunk, track)

    first._run_chunk = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.run(ivs)
    again = Engine(model, prompts, LogitDiff(), batch_size=36, progress=False, checkpoint=ck)
    res = again.run(ivs)
    assert res.n_reused == sum(calls) > 0
    assert torch.equal(res.values, full.values)


def model_heads(model):
    return Adapter(model).heads()


# ---- two gloo ranks against one process --------------------------------------------------------
def test_two_ranks_audit_and_patch_equal_one_process(alone, tmp_path):
    two = tmp_path / "two"
    run = subprocess.run(_torchrun(*AUDIT, "--out", str(two)), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "by 2 ranks" in run.stdout and run.stdout.count("verdicts:") == 1  # rank 0 prints
    assert_same_audit(alone, two)
    meta = json.loads((two / "audit.json").read_text())["meta"]["engine"]
    ref = json.loads((alone / "audit.json").read_text())["meta"]["engine"]
    assert meta["world_size"] == 2 and meta["backend"] == "gloo"
    assert meta["forward_work"] == ref["forward_work"]  # summed over the ranks
    assert not checkpoint_files(two / "evidence.ckpt.safetensors")  # removed when done
    patch = ("patch", "--quiet", "--threads", "1", "--site", "v", "--by", "pos")
    one_p, two_p = tmp_path / "p1", tmp_path / "p2"
    subprocess.run([PY, "-m", "lensattr", *patch, "--out", str(one_p)], check=True, env=_env(),
                   capture_output=True)
    run = subprocess.run(_torchrun(*patch, "--out", str(two_p)), env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (one_p / "patching.csv").read_bytes() == (two_p / "patching.csv").read_bytes()
    m1, m2 = (json.loads((d / "patching.json").read_text()) for d in (one_p, two_p))
    assert m1["n_forwards"] == m2["n_forwards"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_workers(mode: str, out: Path) -> list[subprocess.CompletedProcess]:
    env = {**_env(), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([PY, str(ROOT / "tests" / "dist_worker.py"), mode, str(out)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def test_python_api_under_a_process_group(tmp_path):
    """``activation_patching`` and ``audit`` called under an initialised gloo group share the
    work and give every rank one process's numbers; a rank killed mid-sweep is named."""
    runs = _two_workers("ok", tmp_path)
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    got = load_file(str(tmp_path / "rank0.safetensors"))
    model = lensattr.load_model("planted")
    task = lensattr.tasks.get("planted-copy")
    prompts = task.prompts(n_prompts=16, model=model)
    torch.set_num_threads(1)
    try:
        ref = lensattr.activation_patching(model, prompts, task.metric(), batch_size=16)
        res = lensattr.audit(model, task, n_prompts=16, progress=False)
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    assert torch.equal(got["patching"], ref.values)
    assert torch.equal(got["effect"], torch.tensor(res.heads["effect_selected"].to_numpy()))
    assert torch.equal(got["clean"], res.tensors["clean_metric"])
    killed = tmp_path / "killed"
    killed.mkdir()
    runs = _two_workers("kill", killed)
    assert runs[1].returncode == -signal.SIGKILL
    assert runs[0].returncode == 3, runs[0].stderr[-2000:]
    err = json.loads((killed / "error0.json").read_text())
    assert err["type"] == "RankFailure" and err["ranks"] == [1]
    assert "rank 0 of 2: rank 1 stopped" in err["message"]
    assert "rerun" in err["message"]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _rank_pid(agent: int, rank: int) -> int | None:
    for pid in _children(agent):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds ranks through /proc")
def test_killed_rank_is_named_and_a_rerun_resumes(alone, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(*AUDIT, "--out", str(out)), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rank1 = out / "evidence.ckpt.rank1.safetensors"
    deadline = time.time() + 240
    while not rank1.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # rank 1 saved its first chunk: kill it mid-run
    pid = _rank_pid(proc.pid, 1)
    assert pid is not None and proc.poll() is None, "the run ended before rank 1 was killed"
    os.kill(pid, signal.SIGKILL)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0
    # torchrun's report (or rank 0's own error, when it reached a swap first) names rank 1
    named = re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*-9",
                      log, re.S)
    assert named or "rank 0 of 2: rank 1 stopped" in log, log[-3000:]
    assert not (out / "heads.csv").exists()
    saved = checkpoint_files(out / "evidence.ckpt.safetensors")
    assert rank1 in saved
    # the rerun in one process (another world size) reuses what both ranks saved
    subprocess.run([PY, "-m", "lensattr", *AUDIT, "--out", str(out)], check=True, env=_env(),
                   capture_output=True)
    assert_same_audit(alone, out, resumed=True)
    work = json.loads((out / "audit.json").read_text())["meta"]["engine"]["forward_work"]
    full = json.loads((alone / "audit.json").read_text())["meta"]["engine"]["forward_work"]
    assert work < full  # the saved results were not computed again
    assert not checkpoint_files(out / "evidence.ckpt.safetensors")
