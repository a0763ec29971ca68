"""posttrain: LLM post-training, from SFT to RL on verifiable rewards."""

__version__ = "0.1.0"
