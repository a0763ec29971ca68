"""posttrain.losses."""
