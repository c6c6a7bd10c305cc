"""A Griffe extension (mkdocstrings' ``extensions:`` in mkdocs.yml) for lensattr's free-form
docstrings: it turns their ``name: text`` entries into Markdown list items.

Our docstrings describe fields and attributes as entries at the start of a line, continued by
indented lines::

    heads: one row per (layer, head): claims, effects with ``_lo``/``_hi`` 95% CIs, verdict;
        ``partner_layer``/``partner_head`` are nullable integers (``Int64``).
    edges: one row per (layer, head, query position, source) examined ...

Markdown would run such lines into one paragraph (and an indented block after a blank line into
a code block). Each entry becomes ``- `heads`: one row per ...`` with its continuation lines
kept in the item. Google-style sections (``Args:``, ``Returns:``, ...), which the docstring
parser reads itself, rST literal blocks (after a line ending in ``::``) and fenced code are left
untouched, and so is every docstring without such entries.
"""

from __future__ import annotations

import re

import griffe

_SECTIONS = re.compile(
    r"(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Other Parameters|Returns?"
    r"|Yields?|Receives?|Raises|Exceptions|Warns|Warnings|Examples?|Notes?|Attributes|Functions"
    r"|Methods|Classes|Modules|References|See Also|Todo)\s*:\s*$"
)
_NAME = r"(?:``[^`]+``|`[^`]+`|[A-Za-z_][\w.\[\]<>*-]*)"
_ENTRY = re.compile(rf"(?P<ind> *)(?P<names>{_NAME}(?:\s*(?:,|/)\s*{_NAME})*):\s+(?P<text>\S.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _code(name: str) -> str:
    return name if name.startswith("`") else f"`{name}`"


def _names(names: str) -> str | None:
    """The entry's names as code, or None for prose ("Note: ...", "d_model]: ...")."""
    parts = re.findall(rf"{_NAME}|\s*(?:,|/)\s*", names)
    words = parts[::2]
    if len(words) == 1 and re.fullmatch(r"[A-Z][A-Za-z-]+", words[0]):
        return None
    for w in words:
        bare = w.strip("`")
        if bare.count("[") != bare.count("]") or bare.count("(") != bare.count(")"):
            return None
    return "".join(_code(p) if i % 2 == 0 else p for i, p in enumerate(parts))


def _skip_block(lines: list[str], i: int, base: int) -> int:
    """Index after the block of blank lines and lines indented deeper than ``base``."""
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        i += 1
    return i


def convert(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i, in_list = 0, False
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):  # fenced code: copy through its end
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(stripped[:3]):
                j += 1
            out.extend(lines[i : j + 1])
            i, in_list = j + 1, False
            continue
        if (_indent(line) == 0 and _SECTIONS.fullmatch(stripped)) or stripped.endswith("::"):
            j = _skip_block(lines, i + 1, _indent(line))  # a section or a literal block
            if in_list:
                out.append("")
            out.extend(lines[i:j])
            i, in_list = j, False
            continue
        m = _ENTRY.fullmatch(line.rstrip())
        # an entry starts a line of its own: after a blank line, a line ending in ":" or
        # another entry; elsewhere "word: ..." continues a sentence
        prev = out[-1].rstrip() if out else ""
        mid_sentence = bool(prev.strip()) and not prev.endswith((".", ";", ":", ")", "`"))
        opens = not prev.strip() or prev.endswith(":") or (in_list and not mid_sentence)
        names = _names(m["names"]) if m and opens else None
        if m is None or names is None:
            if in_list and stripped and mid_sentence:  # an unindented continuation line
                out.append("    " + stripped)
                i += 1
                continue
            if in_list and stripped:
                out.append("")  # end the list before the next paragraph
            out.append(line)
            i, in_list = i + 1, in_list and not stripped
            continue
        base = len(m["ind"])
        j = i + 1
        while j < len(lines) and lines[j].strip() and _indent(lines[j]) > base:
            j += 1
        if not in_list and out and out[-1].strip():
            out.append("")
        out.append(f"- {names}: {m['text']}")
        out.extend("    " + c.strip() for c in lines[i + 1 : j])
        i, in_list = j, True
    return "\n".join(out)


class FreeFormDocstrings(griffe.Extension):
    """Rewrite every docstring's ``name: text`` entries as Markdown list items."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
