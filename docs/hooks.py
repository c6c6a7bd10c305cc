"""MkDocs hooks for lensattr's documentation site (``hooks:`` in mkdocs.yml).

* **Notebooks.** Every ``*.ipynb`` stored in ``experiments/notebooks/`` becomes a page under
  ``notebooks/`` and an entry of the "Notebooks" section of the nav. When the environment
  variable ``LENSATTR_EXECUTED_NOTEBOOKS`` names a folder (relative to the repository root)
  holding an executed copy of the same name, that copy is rendered instead (CI's test run
  writes them there); mkdocs-jupyter never executes anything (``execute: false``). No
  notebooks at all is an INFO line, not a warning. ``LENSATTR_NOTEBOOKS_DIR`` overrides the
  stored folder (for trying the site with other notebooks).
* **Command line.** In ``cli.md`` each ``<!-- cli-help: CMD -->`` becomes the ``--help`` text
  of ``lensattr CMD`` (``<!-- cli-help: lensattr -->``: the top level), straight from the
  argparse parser, so the page cannot drift from the code. A sub-command with no marker, or a
  marker naming no sub-command, is a warning (so ``--strict`` fails).
* **Sphinx roles in docstrings.** Our docstrings write ``:func:`lensattr.load_model```; on
  the API pages these become optional cross-references (a link where the object is
  documented, plain code otherwise), never an unresolved-reference warning.
* **No CDN.** A page whose HTML loads a script or a stylesheet from another host is a warning.
* **Complete reference.** A name of ``lensattr.__all__`` on no page of ``docs/api/`` is a warning.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.lensattr")

STORED = "experiments/notebooks"
EXECUTED_ENV = "LENSATTR_EXECUTED_NOTEBOOKS"
STORED_ENV = "LENSATTR_NOTEBOOKS_DIR"
NAV_SECTION = "Notebooks"
FIRST = ("planted_tour.ipynb", "ioi_smollm2.ipynb")  # nav order; any others follow by name
HELP_WIDTH = "100"

_found: dict[str, Path] = {}  # site path (notebooks/NAME.ipynb) -> file to render
_staged: list[Path] = []  # staging folders of this build


# ---------------------------------------------------------------------------------- notebooks


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _folder(root: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


def _order(name: str) -> tuple[int, str]:
    return (FIRST.index(name) if name in FIRST else len(FIRST), name)


def _pick(stored: Path, executed: Path | None) -> Path:
    """The executed copy of ``stored`` when there is one that parses as a notebook."""
    if executed is None:
        return stored
    copy = executed / stored.name
    if not copy.is_file():
        log.info("lensattr: no executed copy of %s in %s; rendering the stored notebook",
                 stored.name, executed)
        return stored
    try:
        cells = json.loads(copy.read_text(encoding="utf-8"))["cells"]
    except (ValueError, KeyError, TypeError) as err:
        log.warning("lensattr: executed notebook %s is not a notebook (%s)", copy, err)
        return stored
    ran = sum(1 for c in cells if c.get("cell_type") == "code" and c.get("outputs"))
    log.info("lensattr: rendering executed %s (%d code cells with output)", copy, ran)
    return copy


def _find_notebooks(root: Path) -> dict[str, Path]:
    stored = _folder(root, os.environ.get(STORED_ENV) or STORED)
    names = sorted((p.name for p in stored.glob("*.ipynb")), key=_order) if stored.is_dir() else []
    if not names:
        log.info("lensattr: no notebooks in %s; the site has no Notebooks section", stored)
        return {}
    executed = None
    if os.environ.get(EXECUTED_ENV):
        executed = _folder(root, os.environ[EXECUTED_ENV])
        if not executed.is_dir():
            log.info("lensattr: %s=%s is not a folder; rendering the stored notebooks",
                     EXECUTED_ENV, executed)
            executed = None
    return {f"notebooks/{n}": _pick(stored / n, executed) for n in names}


def _check_api_pages(root: Path, docs: Path) -> None:
    """Warn for a name of ``lensattr.__all__`` that no ``::: lensattr.NAME`` in docs/api/
    documents (so the reference grows with the top level)."""
    tree = ast.parse((root / "lensattr" / "__init__.py").read_text(encoding="utf-8"))
    names = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", None) == "__all__" for t in n.targets))
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((docs / "api").glob("*.md")))
    shown = set(re.findall(r"^:::\s*lensattr\.(\w+)", text, flags=re.MULTILINE))
    for name in names:
        if name not in shown and not name.startswith("__"):
            log.warning("lensattr: lensattr.%s is in __all__ but on no page of docs/api/ "
                        "(add `::: lensattr.%s`)", name, name)


def on_config(config):
    _check_api_pages(_root(config), Path(config.docs_dir))
    _found.clear()
    _found.update(_find_notebooks(_root(config)))
    if _found:
        nav = config.nav if config.nav is not None else []
        nav = [item for item in nav if not (isinstance(item, dict) and NAV_SECTION in item)]
        config.nav = [*nav, {NAV_SECTION: list(_found)}]
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files, config):
    # mkdocs-jupyter's page wrapper needs a real src_dir (File.generated has none), so the
    # notebooks are copied into a staging folder laid out like docs/, removed after the build
    if not _found:
        return files
    stage = Path(tempfile.mkdtemp(prefix="lensattr-docs-"))
    _staged.append(stage)
    for uri, path in _found.items():
        if files.get_file_from_path(uri) is not None:
            log.warning("lensattr: docs/%s exists; it hides the notebook %s", uri, path)
            continue
        (stage / uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, stage / uri)
        files.append(File(uri, src_dir=str(stage), dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    return files


def _unstage() -> None:
    while _staged:
        shutil.rmtree(_staged.pop(), ignore_errors=True)


def on_post_build(config):
    _unstage()


def on_build_error(error):
    _unstage()


# ------------------------------------------------------------------------------- command line

_MARKER = re.compile(r"<!--\s*cli-help:\s*([\w-]+)\s*-->")


def _help(parser, argv: list[str]) -> str:
    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH  # argparse wraps at the terminal's width
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            parser.parse_args([*argv, "--help"])
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return out.getvalue().rstrip()


def _cli_page(markdown: str) -> str:
    import argparse

    from lensattr.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = list(sub.choices)
    named = set(_MARKER.findall(markdown))
    for cmd in commands:
        if cmd not in named:
            log.warning("lensattr: cli.md has no <!-- cli-help: %s --> for `lensattr %s`",
                        cmd, cmd)

    def block(m: re.Match) -> str:
        cmd = m.group(1)
        if cmd != "lensattr" and cmd not in commands:
            log.warning("lensattr: cli.md names `lensattr %s`, which is no sub-command", cmd)
            return m.group(0)
        text = _help(parser, [] if cmd == "lensattr" else [cmd])
        return f"```text\n$ lensattr {'' if cmd == 'lensattr' else cmd + ' '}--help\n{text}\n```"

    return _MARKER.sub(block, markdown)


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "cli.md":
        return _cli_page(markdown)
    return markdown


# ------------------------------------------------------------------------ docstrings, no CDN

_ROLE = re.compile(
    r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):<code>(~?)([\w.]+?)(\(\))?</code>"
)


def _role(m: re.Match) -> str:
    short, path, call = m.group(1), m.group(2), m.group(3) or ""
    title = (path.rsplit(".", 1)[-1] if short else path) + call
    ident = path if "." in path else f"lensattr.{path}"
    return f'<autoref identifier="{ident}" optional><code>{title}</code></autoref>'


def on_page_content(html, page, config, files):
    if page.file.src_uri.startswith("api/"):
        return _ROLE.sub(_role, html)
    return html


_REMOTE = re.compile(
    r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=[\"']((?:https?:)?//[^\"']+)[\"']"
    r"|\bimport\b[^;\n]*?\bfrom\s*[\"']((?:https?:)?//[^\"']+)[\"']",
    re.IGNORECASE,
)


def on_post_page(output, page, config):
    for m in _REMOTE.finditer(output):
        tag = m.group(0)
        if tag.lower().startswith("<link") and "stylesheet" not in tag.lower():
            continue  # <link rel="canonical"> and the like fetch nothing
        log.warning("lensattr: %s loads %s from another host (the site must not need a CDN)",
                    page.file.src_uri, m.group(1) or m.group(2))
    return output
