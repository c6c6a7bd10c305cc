"""Loading models: the registry of bundled models, local folders, and hub names.

Every path ends in a ``TransformerBridge``; nothing here knows hook names (see ``adapter.py``).
The name a model was loaded under is remembered beside it (:mod:`.state`), not on it.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ModelError
from .placement import Placement, place
from .registry import ModelInfo, register_model, registered
from .state import remember

__all__ = ["load_model", "boot_bridge", "register_model", "list_models", "ModelInfo", "is_hub_id"]


def list_models() -> list[ModelInfo]:
    _ensure_zoo()
    return list(registered().values())


def _ensure_zoo() -> None:
    from . import zoo  # noqa: F401  (registers the bundled models)


def boot_bridge(hf_model, tokenizer, name: str, device: str | None = None,
                placement: Placement | None = None):
    """Boot a ``TransformerBridge`` around an in-memory HF model and tokenizer (offline).
    ``placement``: cast and dispatch it first (see :mod:`.placement`); ``device`` is then
    ignored."""
    if placement is not None:
        device = place(hf_model, placement)
    placed = device is None and bool(getattr(hf_model, "hf_device_map", None))
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
        boot_name, hf_model=hf_model, tokenizer=tokenizer,
        device=None if placed else (device or "cpu"),
    )
    remember(bridge, name=name)  # beside the bridge, not on it (see .state)
    return bridge


# A public name of the same architecture, used only so TransformerLens picks the right adapter
# when it is handed an in-memory model; no download happens because hf_model is given.
_ARCH_BOOT_NAME = {"GPT2LMHeadModel": "gpt2"}


def load_model(
    name_or_path,
    *,
    tokenizer=None,
    name: str | None = None,
    device: str | None = None,
    dtype=None,
    device_map=None,
    n_devices: int | None = None,
    max_memory: dict | None = None,
    **boot_kwargs,
):
    """Load a model as a ``TransformerBridge``.

    ``dtype`` (``torch.bfloat16``, ``"float16"``, ...; default the model's own, float32 for
    bundled models) casts the weights; lensattr's metrics are accumulated in float32 whatever
    the weights. ``device`` puts the whole model on one device; ``device_map`` (``"auto"``,
    ``"balanced"`` or an accelerate dict), ``n_devices`` (split over the first N GPUs) and
    ``max_memory`` (per-device budget) spread its layers instead, as TransformerLens's
    ``boot_transformers`` does (see :mod:`lensattr.models.placement`).

    ``name_or_path`` is, in this order:

    * an in-memory Hugging Face model (``transformers.PreTrainedModel``) with its
      ``tokenizer=`` (required), booted offline; ``name`` names it in results;
    * a bundled model name (``lensattr models`` lists them; built offline);
    * an existing local folder holding an HF checkpoint as ``*.safetensors`` (never a pickled
      ``.bin``);
    * a ``.gguf`` file (or a folder holding exactly one, and no ``config.json``): dequantised
      to float32 and cached, see :mod:`lensattr.gguf_loading`;
    * a hub id, ``org/name`` or a bare legacy name such as ``gpt2`` (dots allowed:
      ``EleutherAI/pythia-1.4b``); needs a reachable hub or a warm HF cache.

    Anything that looks like a path rather than a hub id and does not exist -- it starts with
    ``.``, ``/`` or ``~``, has more than one ``/``, a backslash, a file suffix such as
    ``.gguf`` or ``.safetensors``, or its first component is an existing local folder
    (``models/mine`` where ``models/`` exists) -- is an error at once, without trying the hub.
    """
    where = Placement(device, dtype, device_map, n_devices, max_memory)
    if not isinstance(name_or_path, str):
        return _load_in_memory(name_or_path, tokenizer, name, where)
    if not name_or_path:
        raise ModelError("name_or_path: expected a model name or folder, got an empty string")
    _ensure_zoo()
    if name_or_path in registered():
        _no_tokenizer(tokenizer, f"bundled model {name_or_path!r}")
        info = registered()[name_or_path]
        hf_model, tok = info.builder()
        bridge = boot_bridge(hf_model, tok, name_or_path, placement=where)
        remember(bridge, logits_meaningful=info.logits_meaningful)
        return bridge
    path = Path(name_or_path).expanduser()
    gguf = _gguf_file(path)
    if gguf is not None:
        _no_tokenizer(tokenizer, f"GGUF file {str(gguf)!r} (its own tokenizer is loaded)")
        from .gguf import load_gguf

        hf_model, tok = load_gguf(gguf)
        return boot_bridge(hf_model, tok, gguf.stem, placement=where)
    if path.exists():
        _no_tokenizer(tokenizer, f"folder {name_or_path!r} (its own tokenizer is loaded)")
        return _load_folder(path, where)
    if not is_hub_id(name_or_path):
        hint = ""
        if path.suffix.lower() == ".gguf":
            hint = " (a GGUF file loads from its path, but there is no file there)"
        raise ModelError(
            f"name_or_path: no such file or folder {name_or_path!r}{hint}; it looks like a local "
            "path, not a hub id (org/name), so the hub was not tried"
        )
    if tokenizer is not None:
        boot_kwargs["tokenizer"] = tokenizer
    return _load_hub(name_or_path, where, boot_kwargs)


# file suffixes that mark a path, never a hub repository
_FILE_SUFFIXES = {".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".onnx",
                  ".h5", ".msgpack", ".pkl", ".pickle", ".npz", ".zip", ".tar", ".gz", ".txt"}
_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def is_hub_id(s: str) -> bool:
    """Does ``s`` read as a hub repository id (``org/name`` or a legacy bare ``name``) rather
    than a local path? Used only for strings that do not exist on disk."""
    if s.startswith((".", "/", "~")) or "\\" in s or ".." in s or s.count("/") > 1:
        return False
    if Path(s).suffix.lower() in _FILE_SUFFIXES:
        return False
    parts = s.split("/")
    if not all(_HUB_PART.match(part) for part in parts):
        return False
    return not (len(parts) == 2 and Path(parts[0]).is_dir())  # models/mine: a local folder


def _no_tokenizer(tokenizer, what: str) -> None:
    if tokenizer is not None:
        raise ModelError(f"tokenizer: only used with an in-memory model or a hub id, not with "
                         f"{what}")


def _load_in_memory(hf_model, tokenizer, name: str | None, where: Placement):
    """Boot an in-memory HF model with its tokenizer."""
    kind = type(hf_model).__name__
    if hasattr(hf_model, "cfg") and hasattr(hf_model, "run_with_hooks"):  # already a bridge
        _no_tokenizer(tokenizer, f"a {kind} (it has its own)")
        return hf_model
    pretrained: tuple[type, ...]
    try:
        from transformers import PreTrainedModel

        pretrained = (PreTrainedModel,)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pretrained = ()
    if not isinstance(hf_model, pretrained):
        raise ModelError(
            "name_or_path: expected a model name, a folder, a hub id, or an in-memory Hugging "
            f"Face model (transformers.PreTrainedModel) with tokenizer=..., got {kind}"
        )
    if tokenizer is None:
        raise ModelError(
            f"tokenizer: required with an in-memory model ({kind}); pass the tokenizer it "
            "was trained with, e.g. load_model(hf_model, tokenizer=AutoTokenizer."
            "from_pretrained(...))"
        )
    if not callable(getattr(tokenizer, "get_vocab", None)):
        raise ModelError(
            f"tokenizer: expected a Hugging Face tokenizer, got {type(tokenizer).__name__}"
        )
    cfg_name = str(getattr(hf_model.config, "_name_or_path", "") or "")
    label = name or (Path(cfg_name).name if cfg_name else "") or kind
    return boot_bridge(hf_model, tokenizer, label, placement=where)


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


def _load_folder(path: Path, where: Placement):
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
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True,
                                                        **where.pretrained_kwargs())
    except ValueError:
        from transformers import AutoModel

        hf_model = AutoModel.from_pretrained(str(path), use_safetensors=True,
                                             **where.pretrained_kwargs())
    # with a device map, from_pretrained placed the layers (its hf_device_map)
    return boot_bridge(hf_model, tok, path.name, device=where.device)


def _load_hub(name: str, where: Placement, boot_kwargs):
    from transformer_lens import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(name, **where.boot_kwargs(), **boot_kwargs)
    except Exception as err:  # hub unreachable, unknown name, unsupported architecture
        known = ", ".join(sorted(registered()))
        raise ModelError(
            f"name_or_path: could not load {name!r}: not a bundled model ({known}), not a local "
            f"folder, and loading it from the hub failed ({type(err).__name__}: {err})"
        ) from err
    remember(bridge, name=name)
    return bridge
