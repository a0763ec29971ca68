"""Rollout engines behind one protocol (DESIGN.md §2): the built-in KV-cache sampler."""

from posttrain.rollout.engine import KVCacheGenerator, default_stop_ids
from posttrain.rollout.protocol import Generator, Rollouts, SamplingParams

__all__ = ["Generator", "KVCacheGenerator", "Rollouts", "SamplingParams", "default_stop_ids"]
