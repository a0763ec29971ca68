"""A deterministic tiny Llama-architecture chat model with a built-in byte-level tokenizer.

Nothing is downloaded: the tokenizer maps every byte to one token (no merges) plus four
special tokens, and the model is a few-million-parameter Llama initialised from a seed. Tests
and the demo use it; ``posttrain init-tiny DIR`` writes it as an ordinary HF directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from posttrain.data.chat import DEFAULT_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS, IM_START, IM_END, PAD = SPECIAL_TOKENS

# (hidden, layers, heads, kv_heads, intermediate) per size name.
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "nano": (64, 2, 4, 2, 128),
    "tiny": (192, 4, 6, 2, 512),
    "small": (384, 6, 6, 2, 1024),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens + SPECIAL_TOKENS, ChatML chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=4096
    )
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    return hf


def build_model(
    size: str = "tiny", seed: int = 0, max_position_embeddings: int = 1024
) -> LlamaForCausalLM:
    """A freshly initialised Llama of the given size; identical weights for identical seeds."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny size {size!r}; choose from {sorted(SIZES)}")
    hidden, layers, heads, kv_heads, inter = SIZES[size]
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None
    )
    return model


def init_tiny(output_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as an HF directory that plain transformers loads."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_model(size, seed).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out
