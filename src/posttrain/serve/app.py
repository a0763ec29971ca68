"""The OpenAI-compatible HTTP API (FastAPI) over any ``Generator`` (DESIGN.md §2).

    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages -> chat template -> generate (stream: SSE chunks)
    POST /v1/completions         prompt(s) as text or token ids -> generate (stream: SSE)
    GET  /health                 200 once the server is up

Requests are validated by pydantic models (wrong types are refused, not coerced); every
error, ours or the framework's (bad JSON, unknown route), leaves in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 4xx for the client's mistakes, 500 when
generation itself fails. Neither stops the server. Generation goes through ``Batcher``, so
concurrent requests share engine calls.

Streaming sends the completion as SSE chunks of one token's text each (a multi-byte
character waits for its last byte), then ``data: [DONE]``. The engine returns a call's
completions when the call ends, so the chunks leave together at the end rather than as each
token is sampled; the stream's concatenated text always equals the non-streamed text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.data.chat import render_prompt
from posttrain.errors import DataError, PosttrainError
from posttrain.rollout.protocol import Generator, Rollouts, SamplingParams
from posttrain.serve.batcher import DEFAULT_WAIT_S, Batcher

# OpenAI's defaults where a request gives no max_tokens (legacy completions: 16); both are
# cut to the context window left after the prompt.
DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_N = 128  # OpenAI's limit on n
MAX_STOP = 4  # OpenAI's limit on stop sequences
_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}

# OpenAI parameters this server does not implement: accepted at a neutral value and refused
# otherwise, since silently ignoring them would return something the client did not ask for.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "functions": (None, []), "response_format": (None, {"type": "text"}),
}


# --- errors ------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status, message, kind, param, code)

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, self.kind, self.param, self.code)


class RequestError(APIError, PosttrainError):
    """The client's mistake (a 4xx)."""


def _error(status: int, message: str, kind: str = "invalid_request_error",
           param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    """pydantic's / FastAPI's first complaint about the body, as a 400."""
    err = exc.errors()[0] if isinstance(exc, RequestValidationError) and exc.errors() else {}
    loc = [str(x) for x in err.get("loc", ())][1:]  # drop the leading "body"
    if err.get("type") == "json_invalid":
        return _error(400, "the request body is not valid JSON "
                      f"({err.get('ctx', {}).get('error', 'parse error')})")
    if not loc:
        return _error(400, f"the request body must be a JSON object: {err.get('msg', '')}")
    param = ".".join(loc)
    return _error(400, f"invalid '{param}': {err.get('msg', 'bad value')}", param=loc[0])


def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    """A bug of ours, still in OpenAI's shape (uvicorn logs the traceback)."""
    return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    if status == 404:
        return _error(404, f"no such route: {request.method} {request.url.path}")
    detail = exc.detail if isinstance(exc, StarletteHTTPException) else str(exc)
    return _error(status, str(detail))


# --- request schemas ---------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: "5" is not an int, 1 is not a bool; extra keys are kept for the _NEUTRAL check.
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def row(self) -> dict[str, str]:
        """The message as the chat template takes it (``developer`` is OpenAI's new name
        for ``system``; text parts are joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role,
                "content": content or ""}


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's (vLLM's extension); 0 = off
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(None, validate_default=True)  # -> list[str]
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence cannot be empty")
        return stops

    def budget(self) -> int | None:
        return self.max_tokens


class ChatRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer max_tokens

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


# --- the server --------------------------------------------------------------------------


@dataclass
class _Choice:
    text: str
    finish_reason: str
    tokens: list[int]  # the completion's tokens behind ``text`` (no stop token)


@dataclass
class ServerState:
    """What the routes share; ``app.state.server`` holds it."""

    batcher: Batcher
    tokenizer: Any
    model_name: str
    stop_token_ids: tuple[int, ...]
    context_length: int | None
    created: int

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise RequestError(404, f"the model '{name}' does not exist; this server serves "
                               f"'{self.model_name}'", param="model", code="model_not_found")

    def check_supported(self, req: _SamplingRequest) -> None:
        for key, value in (req.model_extra or {}).items():
            if key in _NEUTRAL and value not in _NEUTRAL[key]:
                raise RequestError(400, f"'{key}' is not supported by this server", param=key,
                                   code="unsupported_parameter")

    def sampling(self, req: _SamplingRequest, prompts: list[list[int]],
                 default_max: int) -> SamplingParams:
        budget = self._budget(req.budget(), max(map(len, prompts)), default_max)
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            max_new_tokens=budget, stop_token_ids=self.stop_token_ids,
            stop_strings=tuple(req.stop), seed=req.seed)

    def _budget(self, asked: int | None, prompt_len: int, default_max: int) -> int:
        room = None if self.context_length is None else self.context_length - prompt_len
        if room is not None and room < 1:
            raise RequestError(400, f"the prompt ({prompt_len} tokens) fills the model's "
                               f"context of {self.context_length} tokens",
                               param="messages", code="context_length_exceeded")
        if asked is None:
            return default_max if room is None else min(default_max, room)
        if room is not None and asked > room:
            raise RequestError(400, f"max_tokens={asked} + the prompt's {prompt_len} tokens "
                               f"exceed the model's context of {self.context_length} tokens",
                               param="max_tokens", code="context_length_exceeded")
        return asked

    def choices(self, ro: Rollouts, stops: Sequence[str]) -> list[_Choice]:
        return [self._choice(toks, reason, stops)
                for toks, reason in zip(ro.completion_ids, ro.finish_reasons, strict=True)]

    def _choice(self, toks: list[int], reason: str, stops: Sequence[str]) -> _Choice:
        if reason == "stop" and toks and toks[-1] in self.stop_token_ids:
            toks = toks[:-1]  # the stop token is not part of the answer
        text = self.tokenizer.decode(toks, **_DECODE)
        # The engine keeps the token that completed a stop string; OpenAI's text ends
        # before the stop string.
        cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        return _Choice(text, reason, toks)

    def pieces(self, c: _Choice) -> Iterator[str]:
        """``c.text`` in per-token pieces for streaming (held back while a token ends inside
        a multi-byte character); incremental decoding over a sliding window, as TGI does."""
        sent, prefix, read = 0, 0, 0
        for k in range(1, len(c.tokens) + 1):
            if sent >= len(c.text):
                return
            prev = self.tokenizer.decode(c.tokens[prefix:read], **_DECODE)
            cur = self.tokenizer.decode(c.tokens[prefix:k], **_DECODE)
            if len(cur) > len(prev) and not cur.endswith("\ufffd"):
                end = min(sent + len(cur) - len(prev), len(c.text))
                yield c.text[sent:end]
                sent, prefix, read = end, read, k
        if sent < len(c.text):
            yield c.text[sent:]

    async def generate(self, prompts: list[list[int]], n: int,
                       sampling: SamplingParams) -> Rollouts:
        try:
            return await self.batcher.generate(prompts, n, sampling)
        except Exception as e:
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}",
                           kind="server_error") from e


def _usage(ro: Rollouts) -> dict[str, int]:
    prompt = sum(map(len, ro.prompt_ids))
    completion = sum(map(len, ro.completion_ids))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream(events: Iterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        for e in events:
            yield e
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _include_usage(req: _SamplingRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


# --- chat completions --------------------------------------------------------------------


async def _chat(srv: ServerState, req: ChatRequest) -> Any:
    srv.check_model(req.model)
    srv.check_supported(req)
    try:
        prompt = render_prompt(srv.tokenizer, [m.row() for m in req.messages])
    except DataError as e:
        raise RequestError(400, str(e), param="messages") from None
    sampling = srv.sampling(req, [prompt], DEFAULT_CHAT_MAX_TOKENS)
    ro = await srv.generate([prompt], req.n, sampling)
    choices, usage = srv.choices(ro, req.stop), _usage(ro)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": srv.model_name}
    if req.stream:
        return _stream(_chat_chunks(srv, head, choices, usage if _include_usage(req) else None))
    return {**head, "object": "chat.completion", "usage": usage, "choices": [
        {"index": i, "message": {"role": "assistant", "content": c.text},
         "logprobs": None, "finish_reason": c.finish_reason} for i, c in enumerate(choices)]}


def _chat_chunks(srv: ServerState, head: dict, choices: list[_Choice],
                 usage: dict | None) -> Iterator[str]:
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(i: int, delta: dict, finish: str | None = None) -> str:
        return _sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}]})

    for i, c in enumerate(choices):
        yield chunk(i, {"role": "assistant", "content": ""})
        for piece in srv.pieces(c):
            yield chunk(i, {"content": piece})
        yield chunk(i, {}, c.finish_reason)
    if usage is not None:
        yield _sse({**head, "choices": [], "usage": usage})


# --- completions -------------------------------------------------------------------------


def _completion_prompts(srv: ServerState, prompt: Any) -> list[list[int]]:
    """Token ids of each prompt: text (tokenised after BOS, if any) or token ids as given."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise RequestError(400, "'prompt' is an empty list", param="prompt")
    ids = [p if isinstance(p, list) else render_prompt(srv.tokenizer, p) for p in prompt]
    vocab = len(srv.tokenizer)
    for p in ids:
        if not p:
            raise RequestError(400, "a prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for t in p):
            raise RequestError(400, f"token ids must be in [0, {vocab})", param="prompt")
    return ids


async def _completions(srv: ServerState, req: CompletionRequest) -> Any:
    srv.check_model(req.model)
    srv.check_supported(req)
    prompts = _completion_prompts(srv, req.prompt)
    sampling = srv.sampling(req, prompts, DEFAULT_COMPLETION_MAX_TOKENS)
    ro = await srv.generate(prompts, req.n, sampling)
    choices, usage = srv.choices(ro, req.stop), _usage(ro)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": srv.model_name}
    if req.stream:
        return _stream(_completion_chunks(srv, head, choices,
                                          usage if _include_usage(req) else None))
    return {**head, "usage": usage, "choices": [
        {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
        for i, c in enumerate(choices)]}


def _completion_chunks(srv: ServerState, head: dict, choices: list[_Choice],
                       usage: dict | None) -> Iterator[str]:
    def chunk(i: int, text: str, finish: str | None = None) -> str:
        return _sse({**head, "choices": [{"index": i, "text": text, "logprobs": None,
                                          "finish_reason": finish}]})

    for i, c in enumerate(choices):
        for piece in srv.pieces(c):
            yield chunk(i, piece)
        yield chunk(i, "", c.finish_reason)
    if usage is not None:
        yield _sse({**head, "choices": [], "usage": usage})


# --- the app -----------------------------------------------------------------------------


def create_app(generator: Generator, tokenizer: Any, *, model_name: str,
               stop_token_ids: Sequence[int] = (), context_length: int | None = None,
               max_batch: int = 32, batch_wait_s: float = DEFAULT_WAIT_S) -> FastAPI:
    """The API over ``generator``. ``stop_token_ids`` end every completion (EOS, end of
    turn); ``context_length`` bounds prompt + max_tokens (None: unbounded)."""
    srv = ServerState(Batcher(generator, max_batch=max_batch, wait_s=batch_wait_s), tokenizer,
                      model_name, tuple(stop_token_ids), context_length, int(time.time()))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        srv.batcher.start()
        try:
            yield
        finally:
            srv.batcher.close()

    app = FastAPI(title="posttrain serve", lifespan=lifespan)
    app.state.server = srv
    app.add_exception_handler(APIError, lambda _, e: e.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    _routes(app, srv)
    return app


def _routes(app: FastAPI, srv: ServerState) -> None:
    def card() -> dict:
        return {"id": srv.model_name, "object": "model", "created": srv.created,
                "owned_by": "posttrain"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        srv.check_model(name)
        return card()

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Any:
        return await _chat(srv, req)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        return await _completions(srv, req)
