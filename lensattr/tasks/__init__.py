"""Tasks: prompts, metric and default model of each bundled experiment (``bundled``: the planted
copy, MiniLM and the character-level tasks; ``text``: IOI, repeated tokens and capital recall on
word-level tokenizers such as SmolLM2's). Importing the package registers them all."""

from . import text  # noqa: F401  (registers ioi, repeat-tokens, capital-recall)
from .bundled import Task, get, list_tasks, register_task

__all__ = ["Task", "register_task", "get", "list_tasks"]
