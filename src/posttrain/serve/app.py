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

Streaming sends each token's text as an SSE chunk as soon as the engine has sampled it
(``Batcher.stream``); a piece is held back while it ends inside a multi-byte character or
could be the start of a stop string, and the stream's concatenated text equals the
non-streamed text. The response starts (200) with the first sampled tokens, so a request the
engine fails on at once is still a plain 500; a failure after that ends the stream with an
error event.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
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
from posttrain.serve.batcher import DEFAULT_WAIT_S, Batcher, TokenUpdate

log = logging.getLogger("posttrain")

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
        return _Choice(text, reason)

    async def generate(self, prompts: list[list[int]], n: int,
                       sampling: SamplingParams) -> Rollouts:
        try:
            return await self.batcher.generate(prompts, n, sampling)
        except Exception as e:
            raise _generation_failed(e) from e

    async def open_stream(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                          ) -> tuple[AsyncIterator[TokenUpdate | Rollouts], TokenUpdate | Rollouts]:
        """The request's token stream and its first item, awaited here so that a request
        that fails before any token is answered with a plain 500."""
        items = self.batcher.stream(prompts, n, sampling)
        try:
            return items, await anext(items)
        except Exception as e:
            raise _generation_failed(e) from e

    def text_stream(self, stops: Sequence[str]) -> _TextStream:
        return _TextStream(self.tokenizer, frozenset(self.stop_token_ids), tuple(stops))


def _generation_failed(e: Exception) -> APIError:
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")


class _TextStream:
    """One completion's text as its tokens arrive, in pieces that never end inside a
    multi-byte character, never hold what may yet become a stop string, and stop before one.

    Detokenising is incremental over a sliding window (as TGI does): the text of the tokens
    since the last complete character, minus the text already read."""

    def __init__(self, tokenizer: Any, stop_ids: frozenset[int], stops: tuple[str, ...]):
        self.tokenizer, self.stop_ids, self.stops = tokenizer, stop_ids, stops
        self.hold = max(map(len, stops), default=1) - 1  # a stop string's longest proper prefix
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.prefix = self.read = 0  # window: ids[prefix:read] decode to the text's tail
        self.sent, self.cut = 0, False

    def push(self, ids: Sequence[int]) -> str:
        """The new text that is safe to send after ``ids`` (possibly empty)."""
        self.ids.extend(t for t in ids if t not in self.stop_ids)  # a stop token has no text
        prev = self.tokenizer.decode(self.ids[self.prefix:self.read], **_DECODE)
        cur = self.tokenizer.decode(self.ids[self.prefix:], **_DECODE)
        if len(cur) > len(prev) and not cur.endswith("\ufffd"):
            self.text += cur[len(prev):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.cut:
            return ""
        hit = min((i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0),
                  default=-1)
        end = hit if hit >= 0 else len(self.text) - self.hold
        self.cut = hit >= 0
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def rest(self, final: str) -> str:
        """What remains to send once the completion's ``final`` text is known."""
        sent = self.text[:self.sent]
        if final.startswith(sent):
            return final[len(sent):]
        # Not seen with byte-level BPE tokenizers; the text already sent cannot be taken back.
        log.warning("streamed text %r is not a prefix of the final text %r", sent, final)
        return ""


def _usage(ro: Rollouts) -> dict[str, int]:
    prompt = sum(map(len, ro.prompt_ids))
    completion = sum(map(len, ro.completion_ids))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class _Chunks:
    """SSE chunks of one streamed request: ``chat.completion.chunk`` (a role delta, then
    content deltas) or ``text_completion`` objects."""

    head: dict
    chat: bool

    def opening(self, i: int) -> str | None:
        return self._choice(i, {"role": "assistant", "content": ""}) if self.chat else None

    def piece(self, i: int, text: str) -> str:
        return self._choice(i, {"content": text} if self.chat else text)

    def end(self, i: int, finish: str) -> str:
        return self._choice(i, {} if self.chat else "", finish)

    def usage(self, usage: dict) -> str:
        return _sse({**self.head, "choices": [], "usage": usage})

    def _choice(self, i: int, body: dict | str, finish: str | None = None) -> str:
        key = "delta" if self.chat else "text"
        return _sse({**self.head, "choices": [{"index": i, key: body, "logprobs": None,
                                               "finish_reason": finish}]})


async def _stream(srv: ServerState, req: _SamplingRequest, prompts: list[list[int]],
                  sampling: SamplingParams, chunks: _Chunks) -> StreamingResponse:
    """Stream the request's completions token by token as the engine samples them."""
    items, first = await srv.open_stream(prompts, req.n, sampling)
    k = len(prompts) * req.n
    texts = [srv.text_stream(req.stop) for _ in range(k)]

    async def body() -> AsyncIterator[str]:
        try:
            for i in range(k):
                if (opening := chunks.opening(i)) is not None:
                    yield opening
            item = first
            while not isinstance(item, Rollouts):
                for i, ids in sorted(item.items()):
                    if piece := texts[i].push(ids):
                        yield chunks.piece(i, piece)
                item = await anext(items)
            for i, c in enumerate(srv.choices(item, req.stop)):
                if rest := texts[i].rest(c.text):
                    yield chunks.piece(i, rest)
                yield chunks.end(i, c.finish_reason)
            if _include_usage(req):
                yield chunks.usage(_usage(item))
            yield "data: [DONE]\n\n"
        except Exception as e:  # the engine failed mid-stream: an error event ends it
            err = _generation_failed(e)
            yield _sse({"error": {"message": err.message, "type": err.kind, "param": None,
                                  "code": None}})
        finally:
            await items.aclose()  # a client that went away stops the sending

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
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": srv.model_name}
    if req.stream:
        chunks = _Chunks({**head, "object": "chat.completion.chunk"}, chat=True)
        return await _stream(srv, req, [prompt], sampling, chunks)
    ro = await srv.generate([prompt], req.n, sampling)
    choices, usage = srv.choices(ro, req.stop), _usage(ro)
    return {**head, "object": "chat.completion", "usage": usage, "choices": [
        {"index": i, "message": {"role": "assistant", "content": c.text},
         "logprobs": None, "finish_reason": c.finish_reason} for i, c in enumerate(choices)]}


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
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": srv.model_name}
    if req.stream:
        return await _stream(srv, req, prompts, sampling, _Chunks(head, chat=False))
    ro = await srv.generate(prompts, req.n, sampling)
    choices, usage = srv.choices(ro, req.stop), _usage(ro)
    return {**head, "usage": usage, "choices": [
        {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
        for i, c in enumerate(choices)]}


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
