"""GGUF checkpoints: dequantised to float32 by ``transformers`` (through the ``gguf`` package)
and cached as safetensors, so only the first load pays for the dequantisation.

The cache lives in ``$LENSATTR_CACHE`` (default ``$XDG_CACHE_HOME/lensattr``, else
``~/.cache/lensattr``), one folder per GGUF file under ``gguf/<stem>-<size>-<sha256[:16]>/``:
``config.json``, ``model.safetensors`` (float32), the tokenizer files and ``lensattr-cache.json``
(what it was made from). A folder is written under a temporary name and renamed into place,
so a crashed or concurrent load never leaves a half-written entry that a later load would
trust. Nothing here knows hook names or TransformerLens.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .adapter import ModelError

__all__ = ["GGUF_INSTALL", "cache_root", "file_sha256", "cache_folder", "load_gguf",
           "load_gguf_tokenizer", "require_gguf"]

GGUF_INSTALL = "pip install gguf"
_META = "lensattr-cache.json"
_FORMAT = 1  # bump when the cached layout changes: older entries are then rebuilt


def cache_root() -> Path:
    """``$LENSATTR_CACHE``, else ``$XDG_CACHE_HOME/lensattr``, else ``~/.cache/lensattr``."""
    env = os.environ.get("LENSATTR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lensattr"


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (about 0.2 s for SmolLM2's 98 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cache_folder(path: Path | str, sha256: str | None = None) -> Path:
    """Where the dequantised copy of the GGUF file ``path`` is (or would be) cached."""
    path = Path(path)
    sha256 = sha256 or file_sha256(path)
    return cache_root() / "gguf" / f"{path.stem}-{path.stat().st_size}-{sha256[:16]}"


def require_gguf(install: str = GGUF_INSTALL) -> None:
    """Raise a ModelError giving ``install`` when the ``gguf`` package is not importable."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            "loading a GGUF file needs the package 'gguf' (transformers dequantises through it), "
            f"which is not installed; install it with: {install}"
        )


def load_gguf(path: Path | str, *, cache: bool = True, install: str = GGUF_INSTALL):
    """(hf_model, tokenizer) from a GGUF file, float32, in eval mode.

    With ``cache`` (the default), the first load dequantises and writes the cache entry; later
    loads read the safetensors copy instead (keyed on the file's size and SHA-256, so an edited
    or replaced file is never served stale). A cache that cannot be written (read-only or
    full disk) only costs a warning. ``install`` is the command named when ``gguf`` is missing.
    """
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise ModelError(f"name_or_path: {str(path)!r} is not a .gguf file")
    sha = file_sha256(path)
    folder = cache_folder(path, sha)
    if cache and _valid(folder, path, sha):
        return _from_cache(folder)
    require_gguf(install)
    model, tok = _dequantise(path)
    if cache:
        try:
            _write(folder, model, tok, {"source": str(path), "file": path.name,
                                        "size": path.stat().st_size, "sha256": sha})
        except OSError as err:
            warnings.warn(f"lensattr: could not cache the dequantised weights in {folder} "
                          f"({err}); the next load dequantises again", stacklevel=2)
    return model, tok


def load_gguf_tokenizer(path: Path | str, *, install: str = GGUF_INSTALL):
    """The tokenizer alone: from the cache entry when there is one, else from the file."""
    from transformers import AutoTokenizer

    path = Path(path)
    sha = file_sha256(path)
    folder = cache_folder(path, sha)
    if _valid(folder, path, sha):
        return _cached_tokenizer(folder)
    require_gguf(install)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _dequantise(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **_float32())
    except (ValueError, KeyError, RuntimeError) as err:  # unsupported architecture, bad file
        raise ModelError(f"name_or_path: transformers could not load the GGUF file "
                         f"{str(path)!r} ({type(err).__name__}: {err})") from err
    return model.eval(), tok


def _float32() -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def _valid(folder: Path, path: Path, sha: str) -> bool:
    try:
        meta = json.loads((folder / _META).read_text())
    except (OSError, ValueError):
        return False
    files = ("config.json", "model.safetensors", "tokenizer_config.json")
    return (meta.get("format") == _FORMAT and meta.get("sha256") == sha
            and meta.get("size") == path.stat().st_size
            and all((folder / f).is_file() for f in files))


def _cached_tokenizer(folder: Path):
    """The cached tokenizer, with the GGUF file's ``add_bos_token`` flag (which
    ``save_pretrained`` does not keep) restored, so both load paths behave alike."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    flag = json.loads((folder / _META).read_text()).get("add_bos_token")
    if flag is not None:
        tok.init_kwargs["add_bos_token"] = flag
    return tok


def _from_cache(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                 use_safetensors=True, **_float32())
    return model.eval(), _cached_tokenizer(folder)


def _write(folder: Path, model, tok, meta: dict) -> None:
    """Write the entry under a temporary name in the same folder, then rename it into place."""
    from safetensors.torch import save_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):  # the weights are plain float32 now
            del cfg.quantization_config
        cfg.architectures = [type(model).__name__]
        cfg.to_json_file(str(tmp / "config.json"))
        save_model(model, str(tmp / "model.safetensors"))  # tied weights stored once
        tok.save_pretrained(str(tmp))
        import transformers

        meta = {**meta, "format": _FORMAT, "transformers": transformers.__version__,
                "add_bos_token": tok.init_kwargs.get("add_bos_token"),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        if folder.exists():  # a stale or partial entry (its meta did not match): replace it
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / _META).exists():  # not a concurrent writer winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
