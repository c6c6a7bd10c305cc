"""``lensattr`` command line: ``audit``, ``models``, ``tasks``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _audit(args) -> int:
    from . import tasks as task_registry
    from .audit import audit
    from .loading import load_model

    task = task_registry.get(args.task)
    model_name = args.model or task.model
    t0 = time.time()
    model = load_model(model_name)
    out = Path(args.out)
    ckpt = out / "evidence.ckpt.safetensors"
    result = audit(
        model,
        task,
        n_prompts=args.n_prompts,
        seed=args.seed,
        progress=not args.quiet,
        checkpoint=str(ckpt),
    )
    result.save(out)
    result.report(out / "report.html")
    ckpt.unlink(missing_ok=True)
    print(result.summary())
    print(
        f"wrote {out / 'heads.csv'}, {out / 'edges.csv'}, {out / 'audit.json'}, "
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
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(fn=_audit)
    sub.add_parser("models", help="list bundled models").set_defaults(fn=_models)
    sub.add_parser("tasks", help="list tasks").set_defaults(fn=_tasks)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lensattr: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
