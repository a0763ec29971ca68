"""``posttrain serve MODEL``: the OpenAI-compatible server (``serve/app.py``) on uvicorn."""

from __future__ import annotations

import argparse
import socket
from typing import Any

from posttrain.errors import PosttrainError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain serve",
        description="serve a model over an OpenAI-compatible HTTP API (/v1/models, "
        "/v1/chat/completions, /v1/completions), batching concurrent requests")
    p.add_argument("model", help="HF model directory (e.g. run/final), .gguf file, pkg:NAME, "
                   "hub id, or 'tiny'")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface; there is no auth)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--max-batch", type=int, default=32,
                   help="most sequences (prompts x n) in one engine call")
    p.add_argument("--served-name", default=None,
                   help="the model name clients ask for (default: MODEL as given)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on a GPU that supports it, else fp32")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own code (off unless asked for)")
    return p


def _precision(choice: str) -> str:
    import torch

    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def build_app(spec: str, *, served_name: str | None = None, max_batch: int = 32,
              precision: str = "auto", trust_remote_code: bool = False) -> Any:
    """Load ``spec`` and return the FastAPI app serving it through the KV-cache engine."""
    import torch

    from posttrain.models.device import pick_device
    from posttrain.models.io import load_model, load_tokenizer, resize_for_tokenizer
    from posttrain.rollout import KVCacheGenerator, default_stop_ids
    from posttrain.serve.app import create_app

    precision = _precision(precision)
    tok = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    # Serving never trains: bf16 weights halve the memory instead of autocasting fp32 ones.
    model = load_model(spec, trust_remote_code=trust_remote_code,
                       dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    resize_for_tokenizer(model, tok)  # a template-less tokenizer may have gained ChatML tokens
    model = model.to(pick_device()).eval()
    config = model.config.get_text_config(decoder=True)
    return create_app(KVCacheGenerator(model, tok, precision=precision), tok,
                      model_name=served_name or spec, stop_token_ids=default_stop_ids(model, tok),
                      context_length=getattr(config, "max_position_embeddings", None),
                      max_batch=max_batch)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads so a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PosttrainError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def serve_main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    if a.max_batch < 1:
        raise PosttrainError(f"--max-batch must be >= 1, got {a.max_batch}")
    if not 0 <= a.port <= 65535:
        raise PosttrainError(f"--port must be in 0..65535, got {a.port}")
    try:
        import fastapi  # noqa: F401  (the app's framework; checked before the model loads)
        import uvicorn
    except ModuleNotFoundError as e:
        raise PosttrainError(f"posttrain serve needs {e.name}: pip install fastapi uvicorn") \
            from None
    sock = _listen(a.host, a.port)
    try:
        app = build_app(a.model, served_name=a.served_name, max_batch=a.max_batch,
                        precision=a.precision, trust_remote_code=a.trust_remote_code)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    name = app.state.server.model_name
    print(f"serving '{name}' at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0
