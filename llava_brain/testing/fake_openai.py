"""A local OpenAI-compatible chat-completions server with fixed latency and deterministic faults.

`POST /v1/chat/completions` answers like the real API (id, object, created, model,
choices[0].message.content, usage), so the official `openai` client talks to it unchanged with
`base_url=server.base_url`. The reply is a pure function of the request's messages (default: one
`Question:` / `===` / `Answer:` pair derived from the user message), so records are reproducible.

Faults are chosen per request by a callable given a `FaultQuery`: the request's number, a key of
its user message (one image) and how many earlier requests carried the same key. Kinds:

  "429"        HTTP 429 with `Retry-After: <retry_after>` seconds
  "500"        HTTP 500
  "slow"       a correct reply after `slow_seconds` (longer than the client's timeout), or at once
               when the server stops
  "malformed"  HTTP 200 whose content breaks the Question/Answer protocol
  "empty"      HTTP 200 with empty content
  "drop"       the connection is closed without any response
  "401"        HTTP 401 whose message echoes the bearer token (a careless server: clients must redact it)

Holding (for tests of interrupted runs, which must not depend on how fast the machine is):
`server.hold_after(n)` answers the next n requests as usual and then keeps every later one waiting
until `server.release()` (or `stop()`), so a test can interrupt a client at a known point.

  python -m llava_brain.testing.fake_openai --latency 0.2     # serve until Ctrl-C; prints the base URL
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_KINDS = ("429", "500", "slow", "malformed", "empty", "drop", "401")
MALFORMED_CONTENT = "Answer:\nthere is no question before this answer\n===\n"


@dataclass(frozen=True)
class FaultQuery:
    index: int  # 0-based number of the request, in arrival order
    key: str  # sha256 of the user message: the same for every attempt at one image
    attempt: int  # earlier requests with the same key
    user: str  # the user message


Faults = Callable[[FaultQuery], str | None]


def by_request(kinds: dict[int, str]) -> Faults:
    """Fault request number i (0-based, arrival order) with kinds[i]."""
    return lambda q: kinds.get(q.index)


def by_image(fragment: str, kinds: list[str]) -> Faults:
    """The first len(kinds) attempts at the image whose context contains `fragment` get kinds[attempt]."""
    return lambda q: kinds[q.attempt] if fragment in q.user and q.attempt < len(kinds) else None


def combine(*faults: Faults) -> Faults:
    """The first fault any of `faults` picks."""
    return lambda q: next((kind for f in faults if (kind := f(q)) is not None), None)


def default_reply(messages: list[dict[str, Any]]) -> str:
    """One Q/A pair naming the first context line and a digest of the whole request (deterministic)."""
    user = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]
    first = user.splitlines()[0] if user.strip() else "an image"
    return f"Question:\nWhat does the image show?\n===\nAnswer:\nIt shows this: {first} (ref {digest})."


def _user_text(messages: list[dict[str, Any]]) -> str:
    return next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")


class FakeOpenAI:
    """Start with `with FakeOpenAI(...) as server:` (or start()/stop()); point clients at `server.base_url`."""

    def __init__(
        self,
        latency: float = 0.0,
        faults: Faults | None = None,
        reply: Callable[[list[dict[str, Any]]], str] = default_reply,
        slow_seconds: float = 2.0,
        retry_after: str = "0.1",
    ):
        self.latency, self.faults, self.reply = latency, faults, reply
        self.slow_seconds, self.retry_after = slow_seconds, retry_after
        self.requests = 0
        self.outcomes: Counter = Counter()  # "ok" or the fault kind -> count
        self.authorizations: set[str] = set()
        self.first_request_at: float | None = None
        self.last_reply_at: float | None = None
        self._attempts: Counter = Counter()
        self._lock = threading.Lock()
        self._hold_from: int | None = None  # requests with this index or later wait for `_released`
        self._released = threading.Event()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def hold_after(self, n: int) -> None:
        """Answer the next `n` requests, then hold every later one until `release()`."""
        with self._lock:
            self._released.clear()
            self._hold_from = self.requests + n

    def release(self) -> None:
        """Let held requests (and all later ones) through."""
        with self._lock:
            self._hold_from = None
        self._released.set()

    def _wait_if_held(self, index: int) -> None:
        with self._lock:
            held = self._hold_from is not None and index >= self._hold_from
        if held:
            self._released.wait()

    def start(self) -> FakeOpenAI:
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes slow and held requests, so that no handler outlives the server
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _register(self, body: dict[str, Any], authorization: str | None) -> tuple[FaultQuery, str | None]:
        user = _user_text(body.get("messages") or [])
        key = hashlib.sha256(user.encode("utf-8")).hexdigest()
        with self._lock:
            query = FaultQuery(self.requests, key, self._attempts[key], user)
            self.requests += 1
            self._attempts[key] += 1
            if authorization:
                self.authorizations.add(authorization)
            if self.first_request_at is None:
                self.first_request_at = time.perf_counter()
        fault = self.faults(query) if self.faults else None
        if fault is not None and fault not in FAULT_KINDS:
            raise ValueError(f"Unknown fault {fault!r}; choose from {FAULT_KINDS}")
        with self._lock:
            self.outcomes[fault or "ok"] += 1
        return query, fault

    def _completion(self, body: dict[str, Any], content: str, index: int) -> dict[str, Any]:
        messages = body.get("messages") or []
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages)
        completion_tokens = len(content.split())
        return {
            "id": f"chatcmpl-fake-{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 overflows when many clients connect at once: dropped SYNs
    # (retransmitted after 1 s) or resets, which a real API front end would not cause.
    request_queue_size = 128
    fake: FakeOpenAI

    def handle_error(self, request, client_address) -> None:
        pass  # clients that time out or are dropped on purpose close sockets under us; that is the point


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real API: clients reuse connections
    # Headers and body go out in separate writes; with Nagle on, the body waits for the client's delayed
    # ACK (~40 ms), a latency the real API does not add.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            return self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
        fake = self.server.fake
        query, fault = fake._register(body, self.headers.get("Authorization"))
        fake._wait_if_held(query.index)
        if fake.latency:
            time.sleep(fake.latency)
        if fault == "drop":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if fault == "429":
            error = {"error": {"message": "Rate limit reached (fake)", "type": "requests", "code": "rate_limit"}}
            return self._send(429, error, {"Retry-After": fake.retry_after})
        if fault == "401":
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            error = {"error": {"message": f"Incorrect API key provided: {token}", "type": "invalid_request_error"}}
            return self._send(401, error)
        if fault == "500":
            return self._send(500, {"error": {"message": "The server had an error (fake)", "type": "server_error"}})
        if fault == "slow":
            fake._stopping.wait(fake.slow_seconds)
        content = {"malformed": MALFORMED_CONTENT, "empty": ""}.get(fault or "")
        if content is None:
            content = fake.reply(body.get("messages") or [])
        self._send(200, fake._completion(body, content, query.index))
        fake.last_reply_at = time.perf_counter()
        return None

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client gave up (timeout): nobody is listening


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency", type=float, default=0.0, help="seconds every request takes before its reply")
    args = p.parse_args(argv)
    with FakeOpenAI(latency=args.latency) as server:
        print(server.base_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
