"""``torch.compile`` for the decoder layers' training forward (config ``compile=true``).

Eager PyTorch runs a decoder layer as ~40 separate kernels per direction: RMSNorm's pow,
mean, rsqrt and scale, RoPE's rotate-and-add, SwiGLU's silu and product, the residual adds,
and a dtype cast around most of them under autocast, each a full pass over the activations.
Inductor fuses those chains into a few loops (C++/OpenMP on CPU, Triton on GPU); the matmuls
stay on the vendor GEMMs. The compiled step is faster and saves fewer activations, so its
peak memory is lower (SmolLM2-135M SFT figures: benchmarks/README.md).

Only the layers are compiled, with dynamic shapes (one graph for every packed length; the
layers share it, so compiling 30 layers costs about one compile), and only for training
forwards: a forward without gradients (generation with a KV cache, reference or old-policy
log-probs) runs the eager layer, so decoding never waits for recompiles. Attention itself is
left out of the graph (``torch.compiler.disable`` in ``models/attention.py``): its per-sequence
loop depends on the packed lengths, which a graph would have to specialise on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from posttrain.models.forward import unwrap_model


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks named by transformers' ``_no_split_modules`` (e.g. LlamaDecoderLayer)."""
    inner = unwrap_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    return [m for m in inner.modules() if type(m).__name__ in names]


def _training_only(layer: nn.Module, compiled: Any) -> None:
    eager = layer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and layer.training:
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    layer.forward = forward
    layer._posttrain_compiled = True


def compile_decoder_layers(model: nn.Module) -> int:
    """Route each decoder layer's training forward through ``torch.compile(dynamic=True)``;
    returns how many layers were set up (compilation itself happens at the first step)."""
    layers = [m for m in _decoder_layers(model) if not getattr(m, "_posttrain_compiled", False)]
    for layer in layers:
        _training_only(layer, torch.compile(layer.forward, dynamic=True))
    return len(layers)
