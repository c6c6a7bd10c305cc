"""``lensattr patch``: activation patching of every head (or path patching from one sender) on a
task, written to ``patching.csv`` (one row per cell) and ``patching.json`` (the result's meta).

The sweep is saved to ``DIR/patching.ckpt.safetensors`` after every forward, so a run that is
interrupted resumes when the same command is run again (the file is removed once the outputs
are written). Flags are checked before the model loads where they can be; each error is one
line naming the flag.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports the library lazily, when a command runs
    from ..evidence.patching_result import ActivationPatching, PathPatching

__all__ = ["add_patch_parser", "CHECKPOINT"]

CHECKPOINT = "patching.ckpt.safetensors"
_SITES = ("z", "q", "k", "v", "pattern")
_BY = ("all", "pos", "dest_src")
_DIRECTIONS = ("denoising", "noising")
_RECEIVERS = ("q", "k", "v", "logits")


def add_patch_parser(sub, fmt) -> None:
    p = sub.add_parser("patch", help="activation patching of every head, or path patching "
                       "from one sender head (--sender)", formatter_class=fmt)
    p.add_argument("--model", default=None, help="model (default: the task's model)")
    p.add_argument("--task", default="planted-copy", help="task name (needs corrupted prompts)")
    p.add_argument("--site", default=None,
                   help=f"activation to patch, one of {', '.join(_SITES)} (default z)")
    p.add_argument("--by", default=None,
                   help="all: every position at once; pos: one position; dest_src: one pattern "
                   "entry (default all)")
    p.add_argument("--direction", default="denoising",
                   help="denoising: clean into corrupted; noising: corrupted into clean")
    p.add_argument("--sender", default=None, metavar="L.H",
                   help="path patching from this head (layer.head, such as 0.1)")
    p.add_argument("--receivers", default=None,
                   help="with --sender: comma list of q, k, v, logits (default all four)")
    p.add_argument("--n-prompts", type=int, default=None,
                   help="number of prompts; None: the task's own number")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="lensattr-patch", help="output folder")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None,
                   help="torch device (None: cpu; under torchrun with CUDA, each rank's GPU)")
    p.add_argument("--dtype", default=None,
                   help="weights' dtype: float32, bfloat16 or float16 (None: the model's own)")
    p.add_argument("--memory-budget", type=int, default=None, metavar="BYTES",
                   help="working memory per forward pass; chunks are sized to fit")
    p.add_argument("--top", type=int, default=10, help="cells shown in the summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=run_patch)


def _flags(args):
    """Checks that need no model; returns (site, by, sender, receivers)."""
    from .common import CLIError

    if args.direction not in _DIRECTIONS:
        raise CLIError(f"--direction: expected one of {', '.join(_DIRECTIONS)}, got "
                       f"{args.direction!r}")
    for flag, value in (("--n-prompts", args.n_prompts), ("--threads", args.threads),
                        ("--memory-budget", args.memory_budget), ("--top", args.top)):
        if value is not None and value < 1:
            raise CLIError(f"{flag}: expected a positive integer, got {value}")
    if args.sender is None:
        if args.receivers is not None:
            raise CLIError("--receivers: applies to path patching only; give --sender L.H")
        site, by = args.site or "z", args.by or "all"
        if site not in _SITES:
            raise CLIError(f"--site: expected one of {', '.join(_SITES)}, got {site!r}")
        if by not in _BY:
            raise CLIError(f"--by: expected one of {', '.join(_BY)}, got {by!r}")
        if by == "dest_src" and site != "pattern":
            raise CLIError("--by: dest_src applies to --site pattern only; use all or pos")
        return site, by, None, None
    for flag in ("site", "by"):
        if getattr(args, flag) is not None:
            raise CLIError(f"--{flag}: applies to activation patching only; path patching "
                           "(--sender) patches the receivers' inputs (--receivers)")
    try:
        layer, head = (int(x) for x in args.sender.split("."))
    except ValueError:
        raise CLIError(f"--sender: expected LAYER.HEAD such as 0.1, got {args.sender!r}"
                       ) from None
    receivers = tuple(r.strip() for r in (args.receivers or ",".join(_RECEIVERS)).split(","))
    bad = [r for r in receivers if r not in _RECEIVERS]
    if bad or len(set(receivers)) != len(receivers):
        raise CLIError(f"--receivers: expected a comma list of distinct {', '.join(_RECEIVERS)}"
                       f", got {args.receivers!r}")
    return None, None, (layer, head), receivers


def run_patch(args) -> int:
    from .. import tasks as task_registry
    from ..core.distributed import finish, init_from_env
    from .common import CLIError, check_out, finish_ranks, parse_dtype, rank_device

    site, by, sender, receivers = _flags(args)
    try:
        task = task_registry.get(args.task)
    except KeyError as err:
        raise CLIError(err.args[0]) from None
    out = Path(args.out)
    check_out(out)  # before any work
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    t0 = time.time()
    device = rank_device(args.device)
    w = init_from_env(device)  # under torchrun: join the ranks (gloo; NCCL on GPUs)
    try:
        result = _sweep(args, task, out, site, by, sender, receivers, device, dtype)
        if w.lead:  # every rank holds the whole result; rank 0 writes it
            frame = result.to_frame()
            frame.to_csv(out / "patching.csv", index=False)
            meta = {**result.meta, "task": task.name}
            (out / "patching.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        finish_ranks(out / CHECKPOINT)
    finally:
        finish()
    if w.lead:
        print(summary(frame, meta, args.top))
        print(f"wrote {out / 'patching.csv'}, {out / 'patching.json'} in "
              f"{time.time() - t0:.1f} s" + (f" by {w.size} ranks" if w.sharded else ""))
    return 0


def _sweep(args, task, out: Path, site, by, sender, receivers, device, dtype):
    """Load the model and run the sweep the flags ask for."""
    from ..evidence.patching import activation_patching, path_patching
    from ..models.adapter import Adapter
    from ..models.loading import load_model
    from .common import CLIError

    model = load_model(args.model or task.model, device=device, dtype=dtype)
    prompts = task.prompts(n_prompts=args.n_prompts, seed=args.seed, model=model)
    if prompts.corrupted is None:
        raise CLIError(f"--task: task {task.name!r} has no corrupted prompts; patching needs them")
    a = Adapter(model)
    if sender is not None:
        try:
            sender = a.check_head(sender, "--sender")
        except ValueError as err:  # "--sender: layer 99 out of range; ..."
            raise CLIError(str(err)) from None
    kw = dict(direction=args.direction, progress=not args.quiet, seed=args.seed,
              checkpoint=out / CHECKPOINT, memory_budget=args.memory_budget)
    result: ActivationPatching | PathPatching
    try:
        if sender is None:
            result = activation_patching(a, prompts, task.metric(), site=site, by=by, **kw)
        else:
            result = path_patching(a, prompts, task.metric(), sender, receivers=receivers, **kw)
    except ValueError as err:
        if str(err).startswith("memory_budget:"):
            raise CLIError("--memory-budget" + str(err)[len("memory_budget"):]) from None
        raise
    return result


def summary(frame, meta: dict, top: int) -> str:
    """A few lines: what ran, then the ``top`` cells by |effect| (cells whose effect is 0 or
    NaN left out)."""
    what = (f"path patching from sender {meta['sender'][0]}.{meta['sender'][1]}"
            if meta["method"] == "path_patching" else
            f"activation patching of {meta['site']} by {meta['by']}")
    lines = [f"{what} on {meta['model']} / {meta['task']} ({meta['n_prompts']} prompts, "
             f"{meta['direction']}, {meta['n_forwards']} forwards, {meta['n_reused']} cells "
             "from the checkpoint)"]
    cols = [c for c in frame.columns if c in ("receiver", "layer", "pos", "head", "head_index",
                                               "dest_pos", "src_pos")]
    ranked = frame[frame["effect"].abs() > 0]  # NaN compares False
    ranked = ranked.reindex(ranked["effect"].abs().sort_values(ascending=False).index)
    if ranked.empty:
        return "\n".join([*lines, "no cell changes the metric"])
    lines.append(f"top {min(top, len(ranked))} of {len(ranked)} cells that change the metric, "
                 "by |effect| (1 = the whole source run's change):")
    for _, r in ranked.head(top).iterrows():
        cell = " ".join(f"{c}={_cell(r[c])}" for c in cols)
        lines.append(f"  {cell}: effect {r['effect']:+.3g} [{r['effect_lo']:+.3g}, "
                     f"{r['effect_hi']:+.3g}], p={r['p_value']:.3g}")
    return "\n".join(lines)


def _cell(v) -> str:
    return "-" if v is None or v != v else str(int(v)) if isinstance(v, float) else str(v)
