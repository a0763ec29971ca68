"""An OpenAI-compatible HTTP server over the rollout engine (``posttrain serve``).

``app.create_app`` builds the FastAPI app over any ``Generator``; ``batcher.Batcher`` batches
concurrent requests into engine calls; ``cli.serve_main`` loads a model and runs uvicorn.
FastAPI is imported only when one of these is used, so ``import posttrain.serve`` is cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Batcher", "create_app", "serve_main"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from posttrain.serve.app import create_app

        return create_app
    if name == "Batcher":
        from posttrain.serve.batcher import Batcher

        return Batcher
    if name == "serve_main":
        from posttrain.serve.cli import serve_main

        return serve_main
    raise AttributeError(f"module 'posttrain.serve' has no attribute {name!r}")
