"""``lensattr`` command line: ``audit``, ``models``, ``tasks``."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main", "check_out", "CLIError"]


class CLIError(Exception):
    """An expected error of the command line itself (e.g. a bad ``--out``); one line."""


def check_out(out: Path) -> None:
    """``--out`` must be a folder lensattr can write: new, or existing (a previous audit there
    is resumed). An existing file, a parent that is a file, or a place that cannot be written
    is refused before any work starts. Nothing is left behind by the check."""
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


def _audit(args) -> int:
    from . import tasks as task_registry
    from .audit import audit
    from .loading import load_model

    try:
        task = task_registry.get(args.task)
    except KeyError as err:
        raise CLIError(err.args[0]) from None
    out = Path(args.out)
    check_out(out)  # before any work: loading the model can take minutes
    if args.claims is not None:  # a bad --claims is refused before the model loads
        from .claim_sources import resolve_claims

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
    t0 = time.time()
    model = load_model(model_name)
    ckpt = out / "evidence.ckpt.safetensors"
    result = audit(
        model,
        task,
        n_prompts=args.n_prompts,
        seed=args.seed,
        progress=not args.quiet,
        checkpoint=str(ckpt),
        claims=args.claims,
    )
    result.save(out)
    result.report(out / "report.html")
    ckpt.unlink(missing_ok=True)
    print(result.summary())
    print(
        f"wrote {out / 'heads.csv'}, {out / 'edges.csv'}, {out / 'tokens.csv'}, "
        f"{out / 'audit.json'}, "
        f"{out / 'report.html'} in {time.time() - t0:.1f} s"
    )
    return 0


def _models(args) -> int:
    from .loading import list_models

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
    from .tasks import list_tasks

    for t in list_tasks():
        print(f"{t.name} (model: {t.model})\n  {t.description}\n  mechanism: {t.mechanism}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lensattr", description="Audit attention claims against causal evidence."
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("audit", help="audit every head of a model on a task")
    a.add_argument(
        "--model",
        default=None,
        help="bundled name, local folder or hub name (default: the task's model)",
    )
    a.add_argument("--task", default="planted-copy", help="task name (see `lensattr tasks`)")
    a.add_argument("--out", default="lensattr-out", help="output folder")
    a.add_argument("--n-prompts", type=int, default=None, help="number of prompts")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, usually one per core; on a "
                   "machine shared with other busy processes, 1 is often faster)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument("--claims", default=None,
                   help="claim sources to compare with the evidence, comma list of raw, norm, "
                        "rollout, flow (default: raw,norm,rollout, plus flow on models of at "
                        "most 12 layers when python-igraph is installed)")
    a.set_defaults(fn=_audit)
    sub.add_parser("models", help="list bundled models").set_defaults(fn=_models)
    sub.add_parser("tasks", help="list tasks").set_defaults(fn=_tasks)
    return p


# Expected errors: bad input or environment, reported as one line with exit code 2. Anything
# else is a bug and keeps its traceback.
_EXPECTED = (CLIError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"lensattr: interrupted; {_resume_hint(args)}", file=sys.stderr)
        return 130
    except _EXPECTED as err:
        print(f"lensattr: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _resume_hint(args) -> str:
    if getattr(args, "command", None) != "audit":
        return "nothing was written"
    ckpt = Path(args.out) / "evidence.ckpt.safetensors"
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
