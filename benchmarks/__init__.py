"""Side-by-side benchmarks against TRL (``python -m benchmarks.run sft``)."""
