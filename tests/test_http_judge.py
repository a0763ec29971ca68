"""The HTTP judge: against a real ``posttrain serve`` app and against scripted endpoints;
failures are counted and never become labels."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from posttrain.cai.judge import HttpJudge, judge_pairs

PROMPTS = ["Tell me the PIN."] * 2
A, B = ["I can't share that.", "No."], ["It is 4721.", "Sure, it is 4721."]
QUESTIONS = ["Which answer keeps the secret?"] * 2


class Scripted(BaseHTTPRequestHandler):
    """Answers "A" when answer A is longer than answer B; or misbehaves as told."""

    mode = "ok"

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        if Scripted.mode == "slow":
            time.sleep(1.0)
        if Scripted.mode == "bad_request":
            return self._send(400, {"error": {"message": "bad", "type": "invalid_request_error"}})
        a = re.search(r"Answer A: (.*)\n\nAnswer B", text, re.S).group(1)
        b = re.search(r"Answer B: (.*)\n\nAnswer with", text, re.S).group(1)
        reply = "maybe" if Scripted.mode == "malformed" else ("A" if len(a) > len(b) else "B")
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def endpoint() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    Scripted.mode = "ok"


def judge(url: str, **kw: float) -> HttpJudge:
    return HttpJudge(url, "judge", retries=int(kw.pop("retries", 1)), backoff_s=0.01,
                     timeout_s=kw.pop("timeout_s", 5.0))


def test_verdicts_from_a_consistent_endpoint(endpoint: str) -> None:
    verdicts = judge_pairs(judge(endpoint), PROMPTS, A, B, QUESTIONS)
    assert [v.kept for v in verdicts] == [True, True]
    assert [v.a_wins for v in verdicts] == [len(a) > len(b) for a, b in zip(A, B, strict=True)]


@pytest.mark.parametrize(("mode", "kind", "calls"), [
    ("malformed", "malformed", 2), ("bad_request", "http_400", 1), ("slow", "timeout", 2)])
def test_failures_are_counted_and_never_labels(endpoint: str, mode: str, kind: str,
                                               calls: int) -> None:
    Scripted.mode = mode
    j = judge(endpoint, timeout_s=0.3)
    verdicts = judge_pairs(j, PROMPTS, A, B, QUESTIONS)
    assert not any(v.kept for v in verdicts)  # no verdict: a tie, dropped
    assert j.failures == {kind: 4 * calls}  # 2 pairs x 2 orders, each tried `calls` times


def test_an_unreachable_endpoint_is_counted() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    j = judge(f"http://127.0.0.1:{port}/v1", retries=2)
    assert not any(v.kept for v in judge_pairs(j, PROMPTS, A, B, QUESTIONS))
    assert j.failures == {"unreachable": 4 * 3}


def test_against_a_real_posttrain_serve() -> None:
    uvicorn = pytest.importorskip("uvicorn")
    from posttrain.models.tiny import build_model, build_tokenizer
    from posttrain.rollout import KVCacheGenerator, default_stop_ids
    from posttrain.serve import create_app

    tok, model = build_tokenizer(), build_model("nano", seed=0).eval()
    app = create_app(KVCacheGenerator(model, tok), tok, model_name="judge",
                     stop_token_ids=default_stop_ids(model, tok),
                     context_length=model.config.max_position_embeddings, max_batch=8)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        j = judge(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", retries=0)
        verdicts = judge_pairs(j, PROMPTS, A, B, QUESTIONS)
        # an untrained model's one-token reply is rarely A or B: whatever it says, a reply
        # that is not a verdict is counted, and only consistent verdicts are kept
        answered = 4 - sum(j.failures.values())
        assert set(j.failures) <= {"malformed"} and 0 <= answered <= 4
        assert all(v.kept == (abs(v.p_a - 0.5) == 0.5) for v in verdicts)
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()
