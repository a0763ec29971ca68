"""posttrain.train."""
