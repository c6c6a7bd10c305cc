"""One rank of a two-process gloo group, started by ``tests/test_distributed.py`` (not a test).

``python tests/dist_worker.py MODE OUT`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. MODE ``ok``: the Python ``activation_patching`` and ``audit`` under the
initialised group; rank 0 saves their numbers to ``OUT/rank0.safetensors``. MODE ``kill``:
rank 1 is killed (SIGKILL) after its first patching forward; rank 0 writes the error it got to
``OUT/error.json`` (its type, message and the ranks it names).
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import lensattr
from lensattr.evidence.patch_runs import PatchRuns

torch.set_num_threads(1)
mode, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
model = lensattr.load_model("planted")
task = lensattr.tasks.get("planted-copy")
prompts = task.prompts(n_prompts=16, model=model)
if mode == "kill" and rank == 1:
    forward = PatchRuns._forward

    def forward_then_die(self, *a, **k):
        result = forward(self, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    PatchRuns._forward = forward_then_die
try:
    patched = lensattr.activation_patching(model, prompts, task.metric(), batch_size=16,
                                           checkpoint=out / "patch.ckpt.safetensors")
except Exception as err:  # what rank 0 reports when rank 1 is gone
    (out / f"error{rank}.json").write_text(json.dumps(
        {"type": type(err).__name__, "message": str(err), "ranks": getattr(err, "ranks", None)}))
    sys.exit(3)
result = lensattr.audit(model, task, n_prompts=16, progress=False)
if rank == 0:
    numbers = {"patching": patched.values.contiguous(),
               "effect": torch.tensor(result.heads["effect_selected"].to_numpy()),
               "clean": result.tensors["clean_metric"].contiguous()}
    save_file(numbers, str(out / "rank0.safetensors"),
              metadata={"verdicts": json.dumps(result.heads["verdict"].tolist()),
                        "world_size": str(result.meta["engine"]["world_size"])})
dist.destroy_process_group()
