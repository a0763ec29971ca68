"""posttrain.algorithms."""
