"""The benchmarks' FLOP count (``benchmarks.common.train_flops_per_token``), against numbers
derived by hand for a toy config, so an MFU figure means what benchmarks/README.md says."""

from __future__ import annotations

from types import SimpleNamespace

from benchmarks.common import train_flops_per_token

# d = 4, L = 1, 2 query heads and 1 KV head of dim 2, MLP 8, vocabulary 10.
CFG = SimpleNamespace(hidden_size=4, num_hidden_layers=1, vocab_size=10, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=2, intermediate_size=8)
# q, o: 2 x 4 x 4 = 32; k, v: 2 x 4 x 2 = 16; MLP 3 x 4 x 8 = 96 -> 144 per layer; head 40.


def test_strict_count_projects_the_head_at_targets_and_attends_per_position():
    # rows of 1 and 3 tokens: keys 1 + (1 + 2 + 3) = 7 over 4 tokens = 1.75 per token;
    # attention 2 matmuls x 2 FLOPs x 4 (heads x head dim) x 1.75 x 3 (fwd + bwd) = 84.
    assert train_flops_per_token(CFG, [1, 3], lm_head_frac=0.5) == 6 * (144 + 20) + 84


def test_mean_length_form_is_the_row_mean_approximation():
    # mean length 2 -> 1 key per token: 12 x 4 x 1 = 48; full head.
    assert train_flops_per_token(CFG, 2.0) == 6 * (144 + 40) + 48
