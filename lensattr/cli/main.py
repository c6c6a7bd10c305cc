"""``lensattr`` command line: ``audit``, ``explain``, ``patch`` (:mod:`.cli_patch`), ``report``,
``models``, ``tasks``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..core.distributed import RankFailure, world
from .common import CLIError, check_out

__all__ = ["main", "check_out", "CLIError"]


def _audit(args) -> int:
    from .. import tasks as task_registry
    from ..auditing.run import audit
    from ..core.distributed import finish, init_from_env
    from ..models.loading import load_model
    from .common import finish_ranks, parse_dtype, rank_device

    try:
        task = task_registry.get(args.task)
    except KeyError as err:
        raise CLIError(err.args[0]) from None
    out = Path(args.out)
    check_out(out)  # before any work: loading the model can take minutes
    if args.claims is not None:  # a bad --claims is refused before the model loads
        from ..claims.sources import resolve_claims

        resolve_claims(args.claims, 0)
    model_name = args.model or task.model
    if args.quiet:  # also the Hugging Face loading bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads: expected a positive integer, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    t0 = time.time()
    device = rank_device(args.device)
    w = init_from_env(device)  # under torchrun: join the ranks (gloo; NCCL on GPUs)
    try:
        model = load_model(model_name, device=device, dtype=dtype)
        ckpt = out / "evidence.ckpt.safetensors"
        result = audit(model, task, n_prompts=args.n_prompts, seed=args.seed,
                       progress=not args.quiet, checkpoint=str(ckpt), claims=args.claims)
        if w.lead:  # every rank holds the whole result; rank 0 writes it
            result.save(out)
            result.report(out / "report.html")
        finish_ranks(ckpt)
    finally:
        finish()
    if w.lead:
        print(result.summary())
        ranks = f" by {w.size} ranks" if w.sharded else ""
        print(
            f"wrote {out / 'heads.csv'}, {out / 'edges.csv'}, {out / 'tokens.csv'}, "
            f"{out / 'audit.json'}, {out / 'verdicts.json'}, "
            f"{out / 'report.html'} in {time.time() - t0:.1f} s{ranks}"
        )
    return 0


def _explain(args) -> int:
    from ..explain import explanation_tests
    from ..models.loading import load_model

    out = Path(args.out)
    check_out(out)
    model = load_model(args.model or _task_model(args.task))
    heads = [_head_arg(h) for h in args.heads] if args.heads else None
    result = explanation_tests(model, args.task, tests=args.tests, heads=heads, eps=args.eps,
                               n_prompts=args.n_prompts, seed=args.seed,
                               n_permutations=args.n_permutations, steps=args.steps)
    result.save(out)
    print(result.summary())
    print(f"wrote {out}/ (explain.json, one CSV per table)")
    return 0


def _head_arg(text: str) -> tuple[int, int]:
    try:
        layer, head = (int(x) for x in text.split(","))
    except ValueError:
        raise CLIError(f"--heads: expected layer,head such as 0,1, got {text!r}") from None
    return layer, head


def _task_model(name: str) -> str:
    from .. import tasks as task_registry

    try:
        return task_registry.get(name).model
    except KeyError as err:
        raise CLIError(err.args[0]) from None


def _models(args) -> int:
    from ..models.loading import list_models

    for m in list_models():
        print(
            f"{m.name}\n  {m.description}\n  size: {m.size}\n  recipe: {m.recipe}\n"
            f"  contains: {m.contains}"
        )
        if m.source:
            print(f"  source: {m.source}")
        if m.license:
            print(f"  license: {m.license}")
    return 0


def _tasks(args) -> int:
    from ..tasks.bundled import list_tasks

    for t in list_tasks():
        print(f"{t.name} (model: {t.model})\n  {t.description}\n  mechanism: {t.mechanism}")
    return 0


def _report(args) -> int:
    from ..auditing.result import Audit

    d = Path(args.dir)
    result = Audit.load(d)  # an unreadable folder is an AuditLoadError (a ValueError)
    out = Path(args.out) if args.out else d / "report.html"
    t0 = time.time()
    written = [result.report(out)]
    if args.figures:
        from ..report.figures import write_figures

        written += write_figures(result, d / "figures")
    print(f"wrote {', '.join(map(str, written))} in {time.time() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..core.version import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="lensattr", description="Audit attention claims against causal evidence.",
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=f"lensattr {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("audit", help="audit every head of a model on a task", formatter_class=fmt)
    a.add_argument(
        "--model",
        default=None,
        help="bundled name, local folder or hub name; None: the task's model",
    )
    a.add_argument("--task", default="planted-copy", help="task name (see `lensattr tasks`)")
    a.add_argument("--out", default="lensattr-out", help="output folder")
    a.add_argument("--n-prompts", type=int, default=None,
                   help="number of prompts; None: the task's own number")
    a.add_argument("--seed", type=int, default=0, help="random seed")
    a.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (None: torch's choice, usually one per core; on a "
                   "machine shared with other busy processes, 1 is often faster)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument("--device", default=None,
                   help="torch device of the model (None: cpu; under torchrun with CUDA, each "
                   "rank's own GPU)")
    a.add_argument("--dtype", default=None,
                   help="model weights' dtype: float32, bfloat16 or float16 (None: the model's "
                   "own); metrics are accumulated in float32")
    a.add_argument("--claims", default=None,
                   help="claim sources to compare with the evidence, comma list of raw, norm, "
                        "rollout, flow (default: raw,norm,rollout, plus flow on models of at "
                        "most 12 layers when python-igraph is installed)")
    a.set_defaults(fn=_audit)
    e = sub.add_parser("explain", help="tests of attention-as-explanation (permuted, "
                       "adversarial, uniform/frozen, token attributions)", formatter_class=fmt)
    e.add_argument("--model", default=None, help="model (default: the task's model)")
    e.add_argument("--task", default="planted-copy", help="task name")
    e.add_argument("--out", default="lensattr-explain", help="output folder")
    e.add_argument("--tests", nargs="+", default=["permuted", "baselines", "adversarial",
                                                  "attributions"], help="tests to run")
    e.add_argument("--heads", nargs="+", default=None, metavar="L,H",
                   help="heads as layer,head (default: every head)")
    e.add_argument("--eps", type=float, default=None, help="metric change counted as none")
    e.add_argument("--n-prompts", type=int, default=None, help="number of prompts")
    e.add_argument("--n-permutations", type=int, default=50, help="permutations per head")
    e.add_argument("--steps", type=int, default=100, help="adversarial search steps")
    e.add_argument("--seed", type=int, default=0, help="random seed")
    e.set_defaults(fn=_explain)
    from .patch import add_patch_parser

    add_patch_parser(sub, fmt)
    r = sub.add_parser("report", help="rebuild the HTML report (and figures) from a saved audit",
                       formatter_class=fmt)
    r.add_argument("dir", help="folder holding a saved audit (audit.json, heads.csv, ...)")
    r.add_argument("--out", default=None, help="report file; None: DIR/report.html")
    r.add_argument("--figures", action="store_true",
                   help="also write PNG and SVG figures to DIR/figures (needs matplotlib)")
    r.set_defaults(fn=_report)
    sub.add_parser("models", help="list bundled models", formatter_class=fmt
                   ).set_defaults(fn=_models)
    sub.add_parser("tasks", help="list tasks", formatter_class=fmt).set_defaults(fn=_tasks)
    return p


# Expected errors: bad input or environment, or a rank of torchrun that stopped, reported as one
# line with exit code 2. Anything else is a bug and keeps its traceback.
_EXPECTED = (CLIError, ValueError, OSError, RankFailure)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"lensattr{_rank()}: interrupted; {_resume_hint(args)}", file=sys.stderr)
        return 130
    except _EXPECTED as err:  # a RankFailure says which rank reports it
        where = "" if isinstance(err, RankFailure) else _rank()
        print(f"lensattr{where}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _rank() -> str:
    """`` (rank R of N)`` under torchrun, where each rank prints its own errors; else empty."""
    import os

    w = world()
    size = w.size if w.sharded else int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = w.rank if w.sharded else int(os.environ.get("RANK", "0") or 0)
    return f" (rank {rank} of {size})" if size > 1 else ""


def _resume_hint(args) -> str:
    from .patch import CHECKPOINT

    name = {"audit": "evidence.ckpt.safetensors", "patch": CHECKPOINT}.get(
        getattr(args, "command", ""))
    if name is None:
        return "nothing was written"
    ckpt = Path(args.out) / name
    if ckpt.exists():
        return (f"rerun the same command with the same --out {args.out!r} to resume from the "
                f"checkpoint {str(ckpt)!r}")
    return f"no checkpoint was written yet; rerunning with --out {args.out!r} starts afresh"


def _one_line(err: BaseException) -> str:
    """The error's message on one line (KeyError's quotes and newlines removed)."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and err.strerror:
        msg = f"{err.strerror}: {err.filename!r}" if err.filename else err.strerror
    msg = " ".join(str(msg).split()) or type(err).__name__
    return msg if len(msg) <= 1000 else msg[:997] + "..."


if __name__ == "__main__":
    sys.exit(main())
