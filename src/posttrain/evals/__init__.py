"""posttrain.evals."""
