"""What the ``lensattr`` sub-commands share: the one-line error and the ``--out`` check."""

from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["CLIError", "check_out"]


class CLIError(Exception):
    """An expected error of the command line itself (e.g. a bad ``--out``); one line."""


def check_out(out: Path) -> None:
    """``--out`` must be a folder lensattr can write: new, or existing (a previous audit there
    is resumed). An existing file, a parent that is a file, or a place that cannot be written
    is refused before any work starts. Nothing is left behind by the check. Under torchrun
    only rank 0 checks (it writes the outputs; the others' checkpoint files follow it), so
    the ranks do not race to make and remove the folder."""
    import os

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out: {str(out)!r} is an existing file; expected a folder (new, or one "
                       "holding a previous audit to resume)")
    created = []
    try:
        missing = [d for d in [out, *out.parents] if not d.exists()]
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        why = err.strerror or str(err)
        raise CLIError(f"--out: cannot write to {str(out)!r} ({why})") from None
    finally:
        for d in reversed(created):
            d.rmdir()


def rank_device(device: str | None) -> str | None:
    """``--device``, or under ``torchrun`` with CUDA, this rank's GPU (``cuda:LOCAL_RANK``)."""
    import os

    if device is not None or int(os.environ.get("WORLD_SIZE", "1") or 1) < 2:
        return device
    import torch

    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else None


def finish_ranks(ckpt: Path) -> None:
    """After rank 0 wrote the outputs: wait for every rank, then rank 0 removes every rank's
    checkpoint file (all its evidence is in the outputs now)."""
    from ..core.distributed import barrier, world
    from ..evidence.checkpoint import checkpoint_files

    barrier("the end of the run")
    if world().lead:
        for f in checkpoint_files(ckpt):
            f.unlink(missing_ok=True)


def parse_dtype(text: str | None):
    """``--dtype`` as a torch dtype (None: the model's own, float32 for bundled models)."""
    if text is None:
        return None
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if text not in names:
        raise CLIError(f"--dtype: expected one of float32, bfloat16, float16, got {text!r}")
    return names[text]
