"""posttrain serve: the OpenAI-compatible server, exercised with the official ``openai``
client over loopback against a real uvicorn server (tiny model, CPU).

The in-process server wraps the engine in ``_Gated``, which counts engine calls, can hold a
call until the test releases it (so concurrent requests are provably queued behind it), can
fail on demand (a model error must give a 500 and leave the server serving), and runs
``step_hook`` after each decode step (to order what the client sees against what the engine
does, without timing anything).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn

from posttrain.data.chat import render_prompt
from posttrain.errors import PosttrainError
from posttrain.models.tiny import build_model, build_tokenizer
from posttrain.rollout import KVCacheGenerator, Rollouts, SamplingParams, default_stop_ids
from posttrain.rollout.engine import DecodeStep
from posttrain.serve.app import _TextStream, create_app
from posttrain.serve.batcher import Batcher

NAME = "tiny-test"
WAIT_S = 60.0  # upper bound on waiting for the server's state; never a timing assertion


class _Gated:
    """A Generator that records each call's prompts, blocks while ``gate`` is clear, and
    raises when a prompt contains ``fail_on``."""

    def __init__(self, inner: KVCacheGenerator, tokenizer):  # noqa: ANN001
        self.inner, self.tok = inner, tokenizer
        self.calls: list[list[list[int]]] = []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.fail_on: str | None = None
        self.step_hook: Callable[[int], None] | None = None  # called with the step's number

    def generate(self, prompts, n, sampling, on_step=None):  # noqa: ANN001, ANN201
        self.calls.append([list(p) for p in prompts])
        self.entered.set()
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        if self.fail_on and any(self.fail_on in self.tok.decode(p) for p in prompts):
            raise RuntimeError("simulated model failure")
        if on_step is None:
            return self.inner.generate(prompts, n, sampling)
        hook, steps = self.step_hook, itertools.count(1)

        def step(s: DecodeStep) -> None:
            on_step(s)
            if hook is not None:
                hook(next(steps))

        return self.inner.generate(prompts, n, sampling, on_step=step)


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _wait_until(cond, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server() -> Iterator[SimpleNamespace]:
    tok = build_tokenizer()
    # "tiny" (not "nano"): its greedy output differs from prompt to prompt.
    model = build_model("tiny", seed=0).eval()
    stops = default_stop_ids(model, tok)
    gen = _Gated(KVCacheGenerator(model, tok), tok)
    app = create_app(gen, tok, model_name=NAME, stop_token_ids=stops,
                     context_length=model.config.max_position_embeddings, max_batch=8)
    sock = _free_socket()
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _wait_until(lambda: srv.started, "uvicorn to start")
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield SimpleNamespace(url=url, app=app, gen=gen, tok=tok, model=model, stops=stops,
                          batcher=app.state.server.batcher)
    srv.should_exit = True
    thread.join(WAIT_S)
    sock.close()


@pytest.fixture(scope="module")
def client(server: SimpleNamespace) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=WAIT_S)


def _engine_text(server: SimpleNamespace, prompt: list[int], max_new_tokens: int,
                 stop_strings: tuple[str, ...] = ()) -> tuple[str, list[int], str]:
    """The engine's own greedy answer, outside the server: (text, tokens, finish reason)."""
    gen = KVCacheGenerator(server.model, server.tok, stop_token_ids=server.stops)
    sp = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, stop_strings=stop_strings)
    ro = gen.generate([prompt], 1, sp)
    toks, reason = ro.completion_ids[0], ro.finish_reasons[0]
    body = toks[:-1] if reason == "stop" and toks[-1] in server.stops else toks
    return server.tok.decode(body, skip_special_tokens=True), toks, reason


def _chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


# --- the OpenAI client round trip ---------------------------------------------------------


def test_list_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_greedy_chat_equals_the_engine(server: SimpleNamespace, client: openai.OpenAI) -> None:
    texts = []
    for content in ["hi", "What is 2+3?"]:
        r = client.chat.completions.create(model=NAME, messages=_chat(content), temperature=0,
                                           max_tokens=12)
        prompt = render_prompt(server.tok, _chat(content))
        want, toks, reason = _engine_text(server, prompt, 12)
        assert r.choices[0].message.content == want
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(toks))
        assert r.usage.total_tokens == len(prompt) + len(toks)
        texts.append(want)
    assert texts[0] != texts[1]  # the prompt reached the model


def test_streaming_chat_equals_plain(client: openai.OpenAI) -> None:
    kw = {"model": NAME, "messages": _chat("hi"), "temperature": 0, "max_tokens": 12}
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # token by token, not one blob
    assert "".join(deltas) == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_stream_is_server_sent_events(server: SimpleNamespace) -> None:
    body = {"messages": _chat("hi"), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_completions_plain_and_streaming(server: SimpleNamespace, client: openai.OpenAI) -> None:
    prompts = ["Once upon a time", "2+2="]
    r = client.completions.create(model=NAME, prompt=prompts, n=2, temperature=0, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt-major: k = i * n + j
    wants = [_engine_text(server, render_prompt(server.tok, p), 8) for p in prompts]
    assert [c.text for c in r.choices] == [w[0] for w in wants for _ in range(2)]
    assert r.usage.prompt_tokens == sum(len(render_prompt(server.tok, p)) for p in prompts)
    assert r.usage.completion_tokens == sum(2 * len(w[1]) for w in wants)
    stream = client.completions.create(model=NAME, prompt=prompts[0], temperature=0,
                                       max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in stream) == wants[0][0]
    ids = client.completions.create(model=NAME, prompt=render_prompt(server.tok, prompts[1]),
                                    temperature=0, max_tokens=8)
    assert ids.choices[0].text == wants[1][0]  # token ids as the prompt


def test_stop_sequence_cuts_the_text(server: SimpleNamespace, client: openai.OpenAI) -> None:
    prompt = render_prompt(server.tok, _chat("hi"))
    full, _, _ = _engine_text(server, prompt, 12)
    stop = next(ch for ch in full if ch.isascii() and ch.isprintable() and ch != " ")
    cut = full.index(stop)
    r = client.chat.completions.create(model=NAME, messages=_chat("hi"), temperature=0,
                                       max_tokens=12, stop=[stop])
    assert r.choices[0].message.content == full[:cut]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 12  # the engine stopped there, not after the budget


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    kw = {"model": NAME, "messages": _chat("hi"), "temperature": 1.0, "max_tokens": 16,
          "seed": 7, "n": 2}
    a, b = (client.chat.completions.create(**kw) for _ in range(2))
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


# --- errors -------------------------------------------------------------------------------

_OK = {"messages": _chat("hi"), "max_tokens": 2}


@pytest.mark.parametrize(("body", "status", "param"), [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    ({"model": NAME}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({**_OK, "n": 0}, 400, "n"),
    ({**_OK, "temperature": -1}, 400, "temperature"),
    ({**_OK, "temperature": "hot"}, 400, "temperature"),
    ({**_OK, "max_tokens": "5"}, 400, "max_tokens"),
    ({**_OK, "stop": [""]}, 400, "stop"),
    ({**_OK, "max_tokens": 10**6}, 400, "max_tokens"),
    ({**_OK, "logprobs": True}, 400, "logprobs"),
    ({**_OK, "model": "gpt-4"}, 404, "model"),
])
def test_malformed_chat_request(server: SimpleNamespace, body, status: int, param) -> None:  # noqa: ANN001
    url = server.url + "/v1/chat/completions"
    if isinstance(body, str):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    assert httpx.post(url, json=_OK).status_code == 200  # still serving


@pytest.mark.parametrize(("body", "param"), [
    ({}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [10**9]}, "prompt"),
    ({"prompt": {"a": 1}}, "prompt"), ({"prompt": "x", "n": 0}, "n"),
])
def test_malformed_completion_request(server: SimpleNamespace, body, param) -> None:  # noqa: ANN001
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_openai_client_sees_4xx_and_the_server_keeps_serving(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=_chat("hi"), n=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=_chat("hi"))
    assert e.value.code == "model_not_found"
    r = client.chat.completions.create(model=NAME, messages=_chat("hi"), max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_unknown_route_is_openai_shaped(server: SimpleNamespace) -> None:
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_model_failure_is_500_and_the_server_keeps_serving(server: SimpleNamespace,
                                                           client: openai.OpenAI) -> None:
    failed = server.batcher.stats.failed_calls
    server.gen.fail_on = "BOOM"
    try:
        r = httpx.post(server.url + "/v1/chat/completions",
                       json={"messages": _chat("BOOM"), "max_tokens": 2})
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=NAME, messages=_chat("BOOM"), max_tokens=2,
                                           stream=True)
    finally:
        server.gen.fail_on = None
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert "simulated model failure" in r.json()["error"]["message"]
    assert server.batcher.stats.failed_calls == failed + 2
    ok = client.chat.completions.create(model=NAME, messages=_chat("BOOM"), max_tokens=2)
    assert ok.usage.completion_tokens > 0


# --- batching -----------------------------------------------------------------------------


def test_concurrent_requests_share_one_engine_call(server: SimpleNamespace,
                                                   client: openai.OpenAI) -> None:
    """One request holds the engine; three more arrive meanwhile and must then run as one
    call (counted by the engine wrapper, not inferred from timing), each getting its own
    answer: the engine's greedy output for that prompt in that very batch."""
    gen, contents = server.gen, ["first", "alpha", "a longer second prompt", "gamma?"]

    def ask(content: str) -> str:
        r = client.chat.completions.create(model=NAME, messages=_chat(content),
                                           temperature=0, max_tokens=6)
        return r.choices[0].message.content

    calls = len(gen.calls)
    gen.gate.clear()
    gen.entered.clear()
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(ask, contents[0])
            assert gen.entered.wait(WAIT_S)
            rest = [pool.submit(ask, c) for c in contents[1:]]
            _wait_until(lambda: server.batcher.pending() == 3, "three queued requests")
            gen.gate.set()
            answers = [f.result(WAIT_S) for f in [first, *rest]]
    finally:
        gen.gate.set()
    assert [len(c) for c in gen.calls[calls:]] == [1, 3]
    assert server.batcher.stats.max_requests_per_call >= 3
    batch = gen.calls[-1]
    inner = KVCacheGenerator(server.model, server.tok, stop_token_ids=server.stops)
    ro = inner.generate(batch, 1, SamplingParams(temperature=0, max_new_tokens=6,
                                                 stop_token_ids=server.stops))
    by_prompt = {tuple(p): server.tok.decode(
        [t for t in toks if t not in server.stops], skip_special_tokens=True)
        for p, toks in zip(batch, ro.completion_ids, strict=True)}
    for content, answer in zip(contents[1:], answers[1:], strict=True):
        assert answer == by_prompt[tuple(render_prompt(server.tok, _chat(content)))]


class _Fake:
    """A Generator returning ``budget`` tokens 1, 2, 3, ... per completion (finish: length);
    it blocks while ``gate`` is clear."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[int, int, SamplingParams]] = []
        self.fail = fail
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def generate(self, prompts, n, sampling):  # noqa: ANN001, ANN201
        self.calls.append((len(prompts), n, sampling))
        self.entered.set()
        assert self.gate.wait(WAIT_S)
        if self.fail:
            raise RuntimeError("engine down")
        k = len(prompts) * n
        toks = [list(range(1, sampling.max_new_tokens + 1)) for _ in range(k)]
        return Rollouts([list(p) for p in prompts], toks, [[0.0] * len(t) for t in toks],
                        ["length"] * k, n)


async def _queued_then_run(b: Batcher, fake: _Fake, jobs: list) -> list:
    """A plug request holds the worker while every job is queued; then the worker drains the
    queue (so which jobs share a batch does not depend on timing). Returns the jobs' results
    (or exceptions); ``fake.calls[0]`` is the plug's call."""
    fake.gate.clear()
    plug = asyncio.ensure_future(b.generate([[9]], 1, SamplingParams(temperature=0,
                                                                     max_new_tokens=1)))
    while not fake.entered.is_set():
        await asyncio.sleep(0.001)
    tasks = [asyncio.ensure_future(b.generate([[1, 2]] * p, n, sp)) for p, n, sp in jobs]
    while b.pending() < len(jobs):
        await asyncio.sleep(0.001)
    fake.gate.set()
    await asyncio.gather(plug, return_exceptions=True)
    return await asyncio.gather(*tasks, return_exceptions=True)


def _run_batcher(fake: _Fake, jobs: list, max_batch: int = 64) -> list:
    b = Batcher(fake, max_batch=max_batch, wait_s=0.0)
    b.start()
    try:
        return asyncio.run(_queued_then_run(b, fake, jobs))
    finally:
        b.close()


def test_batcher_groups_by_sampling_and_cuts_each_budget() -> None:
    greedy = SamplingParams(temperature=0, max_new_tokens=3)
    greedy_long = SamplingParams(temperature=0, max_new_tokens=7, seed=5)  # seed: irrelevant
    hot = SamplingParams(temperature=0.8, max_new_tokens=2)
    seeded = SamplingParams(temperature=0.8, max_new_tokens=2, seed=1)
    fake = _Fake()
    out = _run_batcher(fake, [(1, 1, greedy), (2, 1, greedy_long), (1, 1, hot),
                              (1, 1, seeded), (1, 1, seeded), (1, 2, greedy)])
    # greedy n=1 (3 prompts, budget 7) | hot | seeded | seeded (alone) | greedy n=2
    assert sorted((p, n, s.max_new_tokens) for p, n, s in fake.calls[1:]) == sorted(
        [(3, 1, 7), (1, 1, 2), (1, 1, 2), (1, 1, 2), (1, 2, 3)])
    assert out[0].completion_ids == [[1, 2, 3]] and out[0].finish_reasons == ["length"]
    assert out[1].completion_ids == [list(range(1, 8))] * 2
    assert len(out[5].completion_ids) == 2 and out[5].n == 2


def test_batcher_respects_max_batch() -> None:
    sp = SamplingParams(temperature=0, max_new_tokens=1)
    fake = _Fake()
    _run_batcher(fake, [(1, 2, sp)] * 3, max_batch=4)
    assert [p for p, _, _ in fake.calls[1:]] == [2, 1]  # prompts: 2 + 2 rows, then 2 rows


def test_batcher_routes_engine_errors_and_keeps_running() -> None:
    sp = SamplingParams(temperature=0, max_new_tokens=1)
    fake = _Fake(fail=True)
    b = Batcher(fake, wait_s=0.0)
    b.start()
    try:
        out = asyncio.run(_queued_then_run(b, fake, [(1, 1, sp), (1, 1, sp)]))
        assert all(isinstance(o, RuntimeError) for o in out)
        assert b.stats.failed_calls == 2  # the plug's call and the batch's
        fake.fail = False
        assert asyncio.run(b.generate([[1]], 1, sp)).completion_ids == [[1]]
    finally:
        b.close()


def _pieces(tok, text: str, stops: tuple[str, ...] = ()) -> tuple[list[str], _TextStream]:  # noqa: ANN001
    """``text`` tokenised and pushed one token at a time: the non-empty pieces released."""
    ts = _TextStream(tok, frozenset(), stops)
    pieces = [ts.push([t]) for t in tok.encode(text, add_special_tokens=False)]
    return [p for p in pieces if p], ts


def test_stream_pieces_split_at_characters(server: SimpleNamespace) -> None:
    """Multi-byte characters span several byte tokens: a piece never ends inside one, and
    each character leaves as soon as its last byte is sampled."""
    text = "héllo wörld ✓ 你好"
    pieces, ts = _pieces(server.tok, text)
    assert pieces == list(text) and ts.rest(text) == ""


def test_stream_pieces_hold_back_stop_strings(server: SimpleNamespace) -> None:
    # what may become a stop string is held back, and nothing from a stop string on leaves
    pieces, ts = _pieces(server.tok, "hello world, hello", stops=("lo w", "xyz!"))
    assert "".join(pieces) == "hel" and ts.cut
    assert ts.rest("hel") == ""
    # a stop string that never completes: the held-back tail leaves at the end
    pieces, ts = _pieces(server.tok, "say xy", stops=("xyz!",))
    assert "".join(pieces) == "say" and ts.rest("say xy") == " xy"
    # a stop token has no text
    ts = _TextStream(server.tok, frozenset({7}), ())
    assert ts.push([*server.tok.encode("ok", add_special_tokens=False), 7]) == "ok"


def test_engine_reports_every_step(server: SimpleNamespace) -> None:
    """``on_step`` sees exactly the tokens, log-probs and stops the Rollouts hold."""
    gen = KVCacheGenerator(server.model, server.tok, stop_token_ids=server.stops)
    prompts = [render_prompt(server.tok, _chat(c)) for c in ["hi", "count slowly"]]
    full, _, _ = _engine_text(server, prompts[0], 10)
    stop = next(ch for ch in full[3:] if ch.isprintable() and ch != " ")
    steps: list[DecodeStep] = []
    sp = SamplingParams(temperature=0, max_new_tokens=10, stop_strings=(stop,))
    ro = gen.generate(prompts, 2, sp, on_step=steps.append)
    toks: list[list[int]] = [[] for _ in range(4)]
    lps: list[list[float]] = [[] for _ in range(4)]
    stopped: set[int] = set()
    for st in steps:
        assert not stopped & set(st.rows)  # a stopped row gets no more tokens
        for r, t, lp in zip(st.rows, st.tokens, st.logprobs, strict=True):
            toks[r].append(t)
            lps[r].append(lp)
        stopped |= set(st.stopped)
    assert toks == ro.completion_ids and lps == ro.logprobs
    assert stopped == {k for k, r in enumerate(ro.finish_reasons) if r == "stop"}
    assert stopped and len(stopped) < 4  # some rows stopped early, some ran to the budget
    assert ro.completion_ids == gen.generate(prompts, 2, sp).completion_ids


def test_stream_sends_tokens_while_the_engine_decodes(server: SimpleNamespace,
                                                      client: openai.OpenAI) -> None:
    """The engine stops at its 4th step until the client has read a content chunk (or
    WAIT_S has passed): the first text must reach the client before decoding goes on."""
    events: list[str] = []
    seen = threading.Event()

    def hook(step: int) -> None:
        events.append(f"step {step}")
        if step == 4:
            events.append("engine waits" if seen.wait(WAIT_S) else "engine timed out")

    kw = {"model": NAME, "messages": _chat("count slowly"), "temperature": 0, "max_tokens": 24}
    server.gen.step_hook = hook
    try:
        text = ""
        for c in client.chat.completions.create(**kw, stream=True):
            if c.choices and c.choices[0].delta.content:
                if not seen.is_set():
                    events.append("client reads text")
                    seen.set()
                text += c.choices[0].delta.content
    finally:
        server.gen.step_hook = None
    assert events.index("client reads text") < events.index("step 5")
    assert "engine waits" in events and events[-1] == "step 24"
    assert text == client.chat.completions.create(**kw).choices[0].message.content


def test_streaming_n_and_stop_strings_equal_plain(server: SimpleNamespace,
                                                  client: openai.OpenAI) -> None:
    full, _, _ = _engine_text(server, render_prompt(server.tok, _chat("hi")), 16)
    stop = next(ch for ch in full[2:] if ch.isprintable() and ch != " ")
    kw = {"model": NAME, "messages": _chat("hi"), "temperature": 1.0, "seed": 11, "n": 3,
          "max_tokens": 16, "stop": [stop, "zz"]}
    plain = client.chat.completions.create(**kw)
    texts, finishes = ["", "", ""], [None, None, None]
    for c in client.chat.completions.create(**kw, stream=True):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            finishes[ch.index] = finishes[ch.index] or ch.finish_reason
    assert texts == [c.message.content for c in plain.choices]
    assert finishes == [c.finish_reason for c in plain.choices]
    comp = {"model": NAME, "prompt": ["2+2=", "abc"], "temperature": 0, "max_tokens": 10,
            "n": 2}
    plain_c = client.completions.create(**comp)
    streamed = ["", "", "", ""]
    for c in client.completions.create(**comp, stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.text
    assert streamed == [c.text for c in plain_c.choices]


def test_client_disconnect_mid_stream(server: SimpleNamespace, client: openai.OpenAI) -> None:
    failed = server.batcher.stats.failed_calls
    body = {"messages": _chat("count slowly"), "max_tokens": 64, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        first = next(line for line in r.iter_lines() if '"content": "' in line
                     and '"content": ""' not in line)
    assert first.startswith("data: ")  # the client hung up after its first text
    r = client.chat.completions.create(model=NAME, messages=_chat("hi"), max_tokens=4)
    assert r.usage.completion_tokens > 0
    assert server.batcher.stats.failed_calls == failed


def test_engine_failure_mid_stream_is_an_error_event(server: SimpleNamespace,
                                                     client: openai.OpenAI) -> None:
    def hook(step: int) -> None:
        if step == 3:
            raise RuntimeError("simulated failure mid-stream")

    server.gen.step_hook = hook
    try:
        got = ""
        with pytest.raises(openai.APIError, match="mid-stream"):
            for c in client.chat.completions.create(model=NAME, messages=_chat("hi"),
                                                    max_tokens=20, stream=True):
                got += (c.choices[0].delta.content or "") if c.choices else ""
    finally:
        server.gen.step_hook = None
    assert got  # text had been streamed before the failure
    r = client.chat.completions.create(model=NAME, messages=_chat("hi"), max_tokens=4)
    assert r.usage.completion_tokens > 0


def test_batcher_answers_a_short_request_before_the_call_ends(server: SimpleNamespace) -> None:
    """Two greedy requests share one call; the one with the smaller budget is answered while
    the engine still decodes the other (the engine waits at step 8 until it is), with the
    tokens the engine gives it alone."""
    events: list[str] = []
    answered = threading.Event()
    gen = _Gated(KVCacheGenerator(server.model, server.tok), server.tok)

    def hook(step: int) -> None:
        events.append(f"step {step}")
        if step == 8:
            answered.wait(WAIT_S)

    gen.step_hook = hook
    prompts = [render_prompt(server.tok, _chat(c)) for c in ["hi", "count slowly"]]
    short = SamplingParams(temperature=0, max_new_tokens=3, stop_token_ids=server.stops)
    long = replace(short, max_new_tokens=20)

    async def run(b: Batcher) -> tuple[Rollouts, Rollouts]:
        async def ask_short() -> Rollouts:
            ro = await b.generate([prompts[0]], 1, short)
            events.append("short answered")
            answered.set()
            return ro

        gen.gate.clear()  # a plug call holds the worker until both requests are queued
        plug = asyncio.ensure_future(b.generate([[9]], 1, replace(short, max_new_tokens=1)))
        while not gen.entered.is_set():
            await asyncio.sleep(0.001)
        tasks = [asyncio.ensure_future(ask_short()),
                 asyncio.ensure_future(b.generate([prompts[1]], 1, long))]
        while b.pending() < 2:
            await asyncio.sleep(0.001)
        gen.gate.set()
        await plug
        return tuple(await asyncio.gather(*tasks))

    b = Batcher(gen, wait_s=0.0)
    b.start()
    try:
        ro_short, ro_long = asyncio.run(run(b))
    finally:
        b.close()
    assert [len(c) for c in gen.calls] == [1, 2]  # the plug, then one shared call
    assert events.index("short answered") < events.index("step 9")
    alone = KVCacheGenerator(server.model, server.tok)
    for ro, sp, p in [(ro_short, short, prompts[0]), (ro_long, long, prompts[1])]:
        want = alone.generate([p], 1, sp)
        assert (ro.completion_ids, ro.finish_reasons) == (want.completion_ids,
                                                           want.finish_reasons)


def test_batcher_stream_without_engine_steps() -> None:
    """An engine without ``on_step``: the stream gets all tokens when its call returns."""
    fake = _Fake()
    b = Batcher(fake, wait_s=0.0)
    b.start()

    async def collect() -> list:
        return [item async for item in b.stream([[1, 2]], 2, SamplingParams(max_new_tokens=3))]

    try:
        items = asyncio.run(collect())
    finally:
        b.close()
    assert items[0] == {0: [1, 2, 3], 1: [1, 2, 3]} and isinstance(items[1], Rollouts)
    assert len(items) == 2 and items[1].completion_ids == [[1, 2, 3]] * 2


# --- the command line ---------------------------------------------------------------------


def test_serve_command_round_trip(nano_dir: Path) -> None:
    code = ("import sys; from posttrain.serve.cli import serve_main; "
            "sys.exit(serve_main(sys.argv[1:]))")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(nano_dir), "--port", "0", "--served-name", "nano"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "serve exited before listening"
        url = re.search(r"http://\S+/v1", line).group(0)
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=WAIT_S)
        _wait_until(lambda: httpx.get(url[:-3] + "/health").status_code == 200, "health")
        assert [m.id for m in c.models.list().data] == ["nano"]
        r = c.chat.completions.create(model="nano", messages=_chat("hi"), max_tokens=4)
        assert r.usage.completion_tokens > 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_command_errors(tmp_path: Path) -> None:
    from posttrain.serve.cli import serve_main

    with pytest.raises(PosttrainError, match="not found"):
        serve_main([str(tmp_path / "missing"), "--port", "0"])
    taken = _free_socket()
    try:
        with pytest.raises(PosttrainError, match="cannot listen"):
            serve_main(["tiny", "--port", str(taken.getsockname()[1])])
    finally:
        taken.close()
    with pytest.raises(PosttrainError, match="max-batch"):
        serve_main(["tiny", "--max-batch", "0"])
