"""OpenAICompatibleBackend and CachedBackend against a real HTTP server on 127.0.0.1 that speaks
the chat-completions protocol and plays a script of planned responses (errors, sleeps, garbage),
recording every request and the most requests it ever had in flight at once."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jumpscope.explain.backend import Backend, ChatMessage, ChatReply, ChatRequest, TokenLogprobs
from jumpscope.explain.client import CachedBackend, OpenAICompatibleBackend

KEY = "sk-test-SECRET-0123456789"


def ok_body(text: str, logprobs=None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {"id": "x", "object": "chat.completion", "choices": [choice],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


class Script:
    """What the server answers: ``plan`` steps in order, then ``by_content[user text]`` steps,
    then ``default``. A step is {status, body (dict: JSON, str: raw), headers} and/or
    {"sleep": s}; a step without status echoes the user message as ``echo:<text>``."""

    def __init__(self) -> None:
        self.plan: list[dict] = []
        self.by_content: dict[str, list[dict]] = {}
        self.default: dict = {}
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self.bodies)

    def step(self, body: dict) -> dict:
        with self.lock:
            self.bodies.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            user = next((m["content"] for m in body.get("messages", []) if m["role"] == "user"), "")
            if self.plan:
                return self.plan.pop(0)
            if self.by_content.get(user):
                return self.by_content[user].pop(0)
            return self.default

    def done(self) -> None:
        with self.lock:
            self.in_flight -= 1


def make_handler(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.loads(raw)
            with script.lock:
                script.headers.append(dict(self.headers))
            step = script.step(body)
            try:
                time.sleep(step.get("sleep", 0))
                user = next(m["content"] for m in body["messages"] if m["role"] == "user")
                status = step.get("status", 200)
                payload = step.get("body", ok_body(f"echo:{user}"))
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                if self.path != "/v1/chat/completions":
                    status, data = 404, b'{"error": {"message": "wrong path"}}'
                self.send_response(status)
                for name, value in step.get("headers", {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass
            finally:
                script.done()

    return Handler


@pytest.fixture
def server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # loopback must not go through a proxy
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    script = Script()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(script))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield script
    httpd.shutdown()
    httpd.server_close()


def backend(script: Script, **overrides) -> OpenAICompatibleBackend:
    settings = dict(base_url=script.url, model="tiny-model", timeout_s=0.3, backoff_s=0.01,
                    backoff_max_s=0.05, max_retries=3)
    return OpenAICompatibleBackend(**{**settings, **overrides})


def ask(text: str, **kwargs) -> ChatRequest:
    return ChatRequest(messages=(ChatMessage("system", "be brief"), ChatMessage("user", text)), **kwargs)


# --- retries ------------------------------------------------------------------------------------

def test_429_with_retry_after_then_ok(server):
    server.plan = [{"status": 429, "body": {"error": {"message": "slow down"}}, "headers": {"Retry-After": "0"}}]
    client = backend(server, backoff_s=5, backoff_max_s=5)  # only Retry-After: 0 keeps this fast
    start = time.monotonic()
    [reply] = client.complete([ask("hi")])
    assert time.monotonic() - start < 2
    assert reply.text == "echo:hi" and reply.error is None and not reply.cached
    assert (reply.prompt_tokens, reply.completion_tokens) == (7, 3)
    assert client.stats["retries"] == 1 and client.stats["requests"] == 2 == server.count
    assert client.stats["failures"] == 0 and client.stats["prompt_tokens"] == 7


def test_retry_after_is_capped(server):
    server.plan = [{"status": 503, "headers": {"Retry-After": "100"}}]
    start = time.monotonic()
    [reply] = backend(server, backoff_max_s=0.05).complete([ask("hi")])
    assert reply.text == "echo:hi" and time.monotonic() - start < 2


def test_5xx_then_ok(server):
    server.plan = [{"status": s, "body": "oops"} for s in (500, 502, 503)]
    client = backend(server)
    [reply] = client.complete([ask("hi")])
    assert reply.text == "echo:hi"
    assert client.stats["retries"] == 3 and client.stats["requests"] == 4 and client.stats["failures"] == 0


def test_timeout_then_ok(server):
    server.plan = [{"sleep": 0.8}]
    client = backend(server)
    [reply] = client.complete([ask("hi")])
    assert reply.text == "echo:hi" and client.stats["retries"] == 1


@pytest.mark.parametrize("body", ["{not json", {"id": "no choices"}, {"choices": []},
                                  {"choices": [{"message": {"role": "assistant", "content": None}}]}])
def test_malformed_then_ok(server, body):
    server.plan = [{"status": 200, "body": body}]
    client = backend(server)
    [reply] = client.complete([ask("hi")])
    assert reply.text == "echo:hi"
    assert client.stats["malformed"] == 1 and client.stats["retries"] == 1


def test_always_500_gives_up_without_raising(server):
    server.default = {"status": 500, "body": {"error": {"message": "boom"}}}
    client = backend(server, max_retries=2)
    [reply] = client.complete([ask("hi")])
    assert reply.text is None and "500" in reply.error and "boom" in reply.error
    assert client.stats["failures"] == 1 and client.stats["requests"] == 3 == server.count


@pytest.mark.parametrize("status", [400, 401, 404])
def test_other_4xx_not_retried(server, status):
    server.default = {"status": status, "body": {"error": {"message": "x" * 500}}}
    client = backend(server)
    [reply] = client.complete([ask("hi")])
    assert reply.text is None and f"HTTP {status}" in reply.error
    assert "x" * 200 in reply.error and "x" * 201 not in reply.error  # the server's message, cut to 200
    assert client.stats["requests"] == 1 == server.count and client.stats["failures"] == 1


def test_redirect_is_not_followed(server):
    server.default = {"status": 302, "headers": {"Location": "http://127.0.0.1:1/elsewhere"}, "body": ""}
    client = backend(server)
    [reply] = client.complete([ask("hi")])
    assert reply.text is None and "302" in reply.error and server.count == 1


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = OpenAICompatibleBackend(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1,
                                     backoff_s=0.01, timeout_s=0.3, api_key_env=None)
    [reply] = client.complete([ask("hi")])
    assert reply.text is None and "connection" in reply.error
    assert client.stats["requests"] == 2 and client.stats["failures"] == 1


# --- what is sent -------------------------------------------------------------------------------

def test_request_json(server):
    client = backend(server, extra_body={"seed": 3, "model": "not-this"})
    client.complete([ask("plain", max_tokens=12, temperature=0.5), ask("scored", top_logprobs=4)])
    plain, scored = sorted(server.bodies, key=lambda b: b["messages"][1]["content"])
    assert plain["model"] == "tiny-model"  # extra_body cannot override the request's own fields
    assert plain["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "plain"}]
    assert (plain["max_tokens"], plain["temperature"], plain["seed"]) == (12, 0.5, 3)
    assert "logprobs" not in plain and "top_logprobs" not in plain
    assert scored["logprobs"] is True and scored["top_logprobs"] == 4


def test_authorization_header(server, monkeypatch):
    backend(server).complete([ask("a")])
    assert "Authorization" not in server.headers[-1]
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    backend(server).complete([ask("b")])
    assert server.headers[-1]["Authorization"] == f"Bearer {KEY}"
    monkeypatch.setenv("MY_KEY", "other")
    backend(server, api_key_env="MY_KEY").complete([ask("c")])
    assert server.headers[-1]["Authorization"] == "Bearer other"


def test_require_key(server):
    with pytest.raises(ValueError, match="MY_MISSING_KEY") as caught:
        backend(server, api_key_env="MY_MISSING_KEY", require_key=True)
    assert "\n" not in str(caught.value)


def test_key_never_leaks(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.default = {"status": 401, "body": {"error": {"message": f"Incorrect API key provided: {KEY}"}}}
    client = backend(server)
    [reply] = client.complete([ask("hi")])
    assert "401" in reply.error and "Incorrect API key" in reply.error
    for text in (reply.error, client.identity, repr(client), str(client.stats)):
        assert KEY not in text


def test_logprobs_parsed(server):
    logprobs = {"content": [
        {"token": "Hel", "logprob": -0.1, "top_logprobs": [{"token": "Hel", "logprob": -0.1},
                                                           {"token": "Hi", "logprob": -2.5}]},
        {"token": "lo", "logprob": -0.2, "top_logprobs": []}]}
    server.default = {"status": 200, "body": ok_body("Hello", logprobs)}
    [scored] = backend(server).complete([ask("hi", top_logprobs=2)])
    assert scored.text == "Hello"
    assert scored.logprobs == (TokenLogprobs("Hel", -0.1, {"Hel": -0.1, "Hi": -2.5}),
                               TokenLogprobs("lo", -0.2, {"lo": -0.2}))
    server.default = {}
    [plain] = backend(server).complete([ask("hi")])
    assert plain.logprobs is None


def test_concurrency_bounded_and_ordered(server):
    server.default = {"sleep": 0.3}  # long enough that requests overlap on a loaded machine
    client = backend(server, max_concurrency=3, timeout_s=20)
    texts = [f"q{i}" for i in range(10)]
    replies = client.complete([ask(t) for t in texts])
    assert [r.text for r in replies] == [f"echo:{t}" for t in texts]
    assert 2 <= server.max_in_flight <= 3
    assert client.stats["requests"] == 10 and client.complete([]) == []


# --- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["ftp://x", "localhost:8000", "http://", ""])
def test_bad_base_url(url):
    with pytest.raises(ValueError, match="base_url") as caught:
        OpenAICompatibleBackend(base_url=url, model="m")
    assert repr(url) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name, value", [("timeout_s", 0), ("timeout_s", -1), ("max_concurrency", 0),
                                         ("max_retries", -1), ("backoff_s", -0.5), ("backoff_max_s", 0),
                                         ("max_concurrency", 2.5), ("timeout_s", float("nan"))])
def test_bad_numbers(name, value):
    with pytest.raises(ValueError, match=name):
        OpenAICompatibleBackend(base_url="http://127.0.0.1:1/v1", model="m", **{name: value})


def test_identity():
    client = OpenAICompatibleBackend(base_url="https://api.example.com/v1", model="gpt-x")
    assert isinstance(client, Backend) and isinstance(CachedBackend(client, "unused"), Backend)
    assert client.identity == "openai-compatible:https://api.example.com/v1:gpt-x"
    seeded = OpenAICompatibleBackend(base_url="https://api.example.com/v1", model="gpt-x", extra_body={"seed": 1})
    assert seeded.identity != client.identity  # extra settings change replies: a separate cache


# --- CachedBackend ------------------------------------------------------------------------------

def test_cache_rerun_makes_no_requests(server, tmp_path):
    requests = [ask(f"q{i}") for i in range(4)] + [ask("q0")]  # a duplicate is asked once
    first = CachedBackend(backend(server), tmp_path)
    replies = first.complete(requests)
    assert [r.text for r in replies] == ["echo:q0", "echo:q1", "echo:q2", "echo:q3", "echo:q0"]
    assert server.count == 4 and not any(r.cached for r in replies)
    assert len(list(tmp_path.glob("*/*.json"))) == 4
    again = CachedBackend(backend(server), tmp_path)
    cached = again.complete(requests)
    assert server.count == 4  # nothing new asked
    assert [r.text for r in cached] == [r.text for r in replies] and all(r.cached for r in cached)
    assert again.stats == {"hits": 5, "misses": 0, "write_errors": 0}
    assert cached[0].prompt_tokens == 7 and again.identity == again.inner.identity


def test_cache_written_as_each_reply_arrives(server, tmp_path):
    server.by_content["slow"] = [{"sleep": 1.0}]
    cache = CachedBackend(backend(server, timeout_s=3), tmp_path)
    fast, slow = (cache.path(ask(t).key(cache.identity)) for t in ("fast", "slow"))
    seen = []
    done = threading.Thread(target=lambda: seen.extend(cache.complete([ask("fast"), ask("slow")])))
    done.start()
    deadline = time.monotonic() + 0.8
    while not fast.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fast.exists() and not slow.exists() and done.is_alive()  # written before the batch ends
    done.join(5)
    assert [r.text for r in seen] == ["echo:fast", "echo:slow"]


def test_failed_reply_not_cached(server, tmp_path):
    server.by_content["bad"] = [{"status": 500}, {"status": 500}]
    cache = CachedBackend(backend(server, max_retries=1), tmp_path)
    good, bad = cache.complete([ask("good"), ask("bad")])
    assert good.text == "echo:good" and bad.text is None and server.count == 3
    assert not cache.path(ask("bad").key(cache.identity)).exists()
    good, bad = cache.complete([ask("good"), ask("bad")])
    assert server.count == 4  # only the failed one is asked again, and now it works
    assert good.cached and bad.text == "echo:bad" and not bad.cached


@pytest.mark.parametrize("corrupt", ['{"text": "echo:q", "prompt', "", "[1, 2]", '{"text": null}', "\xff\xfe"])
def test_corrupt_cache_file_is_a_miss(server, tmp_path, corrupt):
    cache = CachedBackend(backend(server), tmp_path)
    cache.complete([ask("q")])
    path = cache.path(ask("q").key(cache.identity))
    path.write_text(corrupt, encoding="latin-1")
    [reply] = cache.complete([ask("q")])
    assert reply.text == "echo:q" and not reply.cached and server.count == 2
    assert ChatReply.from_json(json.loads(path.read_text())).text == "echo:q"  # rewritten
    [reply] = cache.complete([ask("q")])
    assert reply.cached and server.count == 2


def test_cache_key_depends_on_model(server, tmp_path):
    CachedBackend(backend(server, model="a"), tmp_path).complete([ask("q")])
    other = CachedBackend(backend(server, model="b"), tmp_path)
    [reply] = other.complete([ask("q")])
    assert not reply.cached and server.count == 2 and server.bodies[-1]["model"] == "b"
    assert len(list(Path(tmp_path).glob("*/*.json"))) == 2


def test_cache_wraps_a_backend_without_on_reply(tmp_path):
    class Fake:
        identity = "fake"

        def __init__(self):
            self.asked = []

        def complete(self, requests):
            self.asked += requests
            return [ChatReply(text=r.messages[-1].content.upper()) for r in requests]

    inner = Fake()
    cache = CachedBackend(inner, tmp_path)
    assert [r.text for r in cache.complete([ask("a"), ask("b")])] == ["A", "B"]
    assert [r.text for r in cache.complete([ask("a"), ask("c")])] == ["A", "C"]
    assert len(inner.asked) == 3 and cache.stats["hits"] == 1
