"""Loading models: the registry of bundled models, local folders, and hub names.

Every path ends in a ``TransformerBridge``; nothing here knows hook names (see ``model.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .model import ModelError

__all__ = ["load_model", "boot_bridge", "register_model", "list_models", "ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    size: str
    recipe: str
    contains: str
    builder: Callable[[], tuple[object, object]]  # -> (hf_model, tokenizer)
    logits_meaningful: bool = True  # False: encoder without a trained output head
    source: str = ""  # where the weights come from (a package, a file), when not in the repo
    license: str = ""  # the weights' license, when not the repository's own


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo) -> ModelInfo:
    """Register a bundled model; refuses duplicates."""
    if info.name in _REGISTRY:
        raise ValueError(f"model {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def list_models() -> list[ModelInfo]:
    _ensure_zoo()
    return list(_REGISTRY.values())


def _ensure_zoo() -> None:
    from . import zoo  # noqa: F401  (registers the bundled models)


def boot_bridge(hf_model, tokenizer, name: str, device: str | None = None):
    """Boot a ``TransformerBridge`` around an in-memory HF model and tokenizer (offline)."""
    from transformer_lens import TransformerBridge

    init = getattr(tokenizer, "init_kwargs", None)
    if isinstance(init, dict):  # avoids KeyError / hub fall-back in get_tokenizer_with_bos
        init.setdefault("name_or_path", name)
        if getattr(tokenizer, "bos_token", None) is not None:
            init.setdefault("add_bos_token", True)
    hf_model.eval()
    arch = (getattr(hf_model.config, "architectures", None) or [None])[0]
    boot_name = _ARCH_BOOT_NAME.get(arch or type(hf_model).__name__, name)
    bridge = TransformerBridge.boot_transformers(
        boot_name, hf_model=hf_model, tokenizer=tokenizer, device=device or "cpu"
    )
    bridge._lensattr_name = name
    return bridge


# A public name of the same architecture, used only so TransformerLens picks the right adapter
# when it is handed an in-memory model; no download happens because hf_model is given.
_ARCH_BOOT_NAME = {"GPT2LMHeadModel": "gpt2"}


def load_model(name_or_path: str, *, device: str | None = None, **boot_kwargs):
    """Load a model as a ``TransformerBridge``.

    ``name_or_path`` is, in this order: a bundled model name (``lensattr models`` lists them;
    built offline), a local folder holding an HF checkpoint as ``*.safetensors`` (never a
    pickled ``.bin``), a ``.gguf`` file (or a folder holding exactly one, and no
    ``config.json``; dequantised to float32 and cached, see :mod:`lensattr.gguf_loading`), or a
    hub name (needs a reachable hub or a warm HF cache).
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ModelError(f"name_or_path: expected a model name or folder, got {name_or_path!r}")
    _ensure_zoo()
    if name_or_path in _REGISTRY:
        info = _REGISTRY[name_or_path]
        hf_model, tok = info.builder()
        bridge = boot_bridge(hf_model, tok, name_or_path, device=device)
        bridge._lensattr_logits_meaningful = info.logits_meaningful
        return bridge
    path = Path(name_or_path)
    gguf = _gguf_file(path)
    if gguf is not None:
        from .gguf_loading import load_gguf

        return boot_bridge(*load_gguf(gguf), gguf.stem, device=device)
    if path.exists():
        return _load_folder(path, device)
    if name_or_path.startswith((".", "/")) or os.sep in name_or_path and path.suffix:
        raise ModelError(f"name_or_path: no such folder {name_or_path!r}")
    return _load_hub(name_or_path, device, boot_kwargs)


def _gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the only ``*.gguf`` of a folder that has no
    ``config.json``; None when it names no GGUF file."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ModelError(f"name_or_path: folder {str(path)!r} holds several GGUF files "
                         f"{[p.name for p in found]}; pass the path of one of them")
    return found[0] if found else None


def _load_folder(path: Path, device):
    if not path.is_dir():
        raise ModelError(f"name_or_path: {str(path)!r} is a file; expected a model folder or "
                         "a .gguf file")
    if not (path / "config.json").exists():
        raise ModelError(f"name_or_path: folder {str(path)!r} has no config.json")
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        extra = (
            f" (found pickled checkpoint(s) {pickled}; lensattr never unpickles weights: "
            "convert them to safetensors)"
            if pickled
            else ""
        )
        raise ModelError(f"name_or_path: folder {str(path)!r} has no *.safetensors weights{extra}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)
    except ValueError:
        from transformers import AutoModel

        hf_model = AutoModel.from_pretrained(str(path), use_safetensors=True)
    return boot_bridge(hf_model, tok, path.name, device=device)


def _load_hub(name: str, device, boot_kwargs):
    from transformer_lens import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(name, device=device or "cpu", **boot_kwargs)
    except Exception as err:  # hub unreachable, unknown name, unsupported architecture
        known = ", ".join(sorted(_REGISTRY))
        raise ModelError(
            f"name_or_path: could not load {name!r}: not a bundled model ({known}), not a local "
            f"folder, and loading it from the hub failed ({type(err).__name__}: {err})"
        ) from err
    bridge._lensattr_name = name
    return bridge
