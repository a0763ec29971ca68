"""``posttrain generate``: completions of a prompt dataset, optionally filtered by rewards,
written as SFT or preference rows (best-of-n, rejection sampling, distillation)."""

from posttrain.generate.run import GenerateConfig, run_generate

__all__ = ["GenerateConfig", "run_generate"]
