"""Load and save policy models and tokenizers in HF format.

Model specs: a local HF directory, a hub id, a ``.gguf`` file, ``pkg:NAME`` (a GGUF shipped
in an installed package), or ``tiny`` / ``tiny:SIZE`` for the built-in tiny Llama; see
``posttrain.models.resolve``, which also turns a missing directory, a run directory without
``config.json`` and an unreachable hub id into one-line errors before transformers sees them.
Weights are kept in fp32 (the engine autocasts to bf16) unless ``dtype`` says otherwise.
``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from posttrain.data.chat import ensure_chat_template
from posttrain.errors import PosttrainError
from posttrain.models import tiny
from posttrain.models.resolve import resolve_spec

log = logging.getLogger("posttrain")


def _tiny_size(spec: str) -> str | None:
    if spec == "tiny":
        return "tiny"
    if spec.startswith("tiny:"):
        return spec.split(":", 1)[1]
    return None


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).exists()


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):  # noqa: ANN201
    """The tokenizer of a model spec, with a chat template guaranteed (ChatML if it had none)."""
    if _tiny_size(spec):
        return tiny.build_tokenizer()
    path = resolve_spec(spec)  # checks dirs and hub ids; GGUF / pkg: -> cached HF directory
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PosttrainError(_not_found_message(spec, e)) from None
    if tok.pad_token is None:
        # Padding only appears in padded (non-packed) batches, where it is masked out.
        tok.pad_token = tok.eos_token
    ensure_chat_template(tok)
    return tok


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    seed: int = 0,
    attn_implementation: str | None = "sdpa",
) -> PreTrainedModel:
    """A causal LM from a spec; ``tiny`` builds the deterministic tiny model from ``seed``."""
    size = _tiny_size(spec)
    if size:
        return tiny.build_model(size, seed=seed).to(dtype)
    path = resolve_spec(spec)  # checks dirs and hub ids; GGUF / pkg: -> cached HF directory
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except (OSError, ValueError) as e:
        raise PosttrainError(_not_found_message(spec, e)) from None
    return model


def resize_for_tokenizer(model: PreTrainedModel, tokenizer) -> None:  # noqa: ANN001
    """Grow the embeddings when the tokenizer gained tokens (e.g. a default chat template)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        log.warning("resizing embeddings %d -> %d for added special tokens",
                    model.get_input_embeddings().weight.shape[0], len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))


def _not_found_message(spec: str, err: Exception) -> str:
    if _looks_local(spec):
        return f"cannot load model '{spec}': {str(err).splitlines()[0]}"
    return (
        f"cannot load model '{spec}': not a local directory and not reachable on the hub "
        f"({str(err).splitlines()[0]}). Use a local HF directory, a .gguf file, or 'tiny'."
    )
