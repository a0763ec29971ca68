"""``python -m posttrain ...`` runs the same command as ``posttrain ...``."""

from posttrain.cli import entry

entry()
