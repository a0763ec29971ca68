"""User-facing errors: the CLI prints their message, never a traceback."""


class PosttrainError(Exception):
    """An error caused by the user's input (config, data, model path), with a clear message."""


class ConfigError(PosttrainError):
    """A bad config key or value."""


class DataError(PosttrainError):
    """A bad data source or row; the message names the file, line or row index, and field."""


class TrainingError(PosttrainError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""
