"""Built-in synthetic tasks (registered on import)."""
