"""A chat-completions client for any OpenAI-compatible endpoint, and an on-disk reply cache.

:class:`OpenAICompatibleBackend` POSTs each :class:`ChatRequest` to ``<base_url>/chat/completions``
(hosted APIs, vLLM, llama.cpp's server, Ollama) with the standard library only. Requests run on a
thread pool, at most ``max_concurrency`` in flight; replies come back in request order. HTTP 429,
5xx, timeouts, dropped connections and malformed bodies are retried with capped exponential
backoff (a ``Retry-After`` in seconds is honoured); other 4xx fail at once. A request that still
has no usable reply gives ``ChatReply(text=None, error=...)``: ``complete`` never raises for one.
The API key is read from an environment variable (none sent when it is unset) and never appears
in ``identity``, the repr or any error text.

:class:`CachedBackend` wraps any backend: each successful reply is written atomically to
``<folder>/<key[:2]>/<key>.json`` (key: :meth:`ChatRequest.key` of the inner identity) as soon as
it arrives, so an interrupted run loses nothing it paid for; a re-run serves it with
``cached=True`` and makes no request. Failed replies are not cached, and a corrupt cache file is a
miss that gets rewritten.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError
from ..safeio import one_line, read_json, short, write_text
from .backend import Backend, ChatReply, ChatRequest, TokenLogprobs

__all__ = ["OpenAICompatibleBackend", "CachedBackend"]

MAX_REPLY_BYTES = 32 << 20  # a chat reply is kilobytes; a larger body is refused as malformed
MAX_CACHE_BYTES = 16 << 20

OnReply = Callable[[int, ChatReply], None]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would follow a redirect with the Authorization header to any host, and turn a POST
    # into a GET: a redirect is an error reply instead.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Malformed(Exception):
    """A 2xx body that is not a chat-completions reply (retried: servers under load send these)."""


@dataclass(kw_only=True)
class OpenAICompatibleBackend:
    """A client for one model behind an OpenAI-compatible chat-completions endpoint."""

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    require_key: bool = False
    timeout_s: float = 60
    max_concurrency: int = 4
    max_retries: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 30
    extra_body: dict[str, Any] | None = None
    """Merged into every request's JSON (the request's own fields win, so the cache key stays true)."""
    stats: dict[str, int] = field(init=False, repr=False, compare=False)
    _lock: threading.Lock = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.base_url) if isinstance(self.base_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"base_url must be an http:// or https:// URL, got {short(self.base_url)}")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model must be a non-empty string, got {short(self.model)}")
        for name, integer, zero_ok in (("timeout_s", False, False), ("max_concurrency", True, False),
                                       ("max_retries", True, True), ("backoff_s", False, True),
                                       ("backoff_max_s", False, False)):
            value = getattr(self, name)
            kinds = int if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or value != value \
                    or value < 0 or (value == 0 and not zero_ok) or value == float("inf"):
                need = ">= 0" if zero_ok else "positive"
                what = "integer" if integer else "number"
                raise ConfigError(f"{name} must be a finite {need} {what}, got {short(value)}")
        if self.extra_body is not None:
            try:  # refuse now what could not be sent later; copy so a caller's edit cannot change replies
                self.extra_body = json.loads(json.dumps(self.extra_body, allow_nan=False))
            except (TypeError, ValueError) as error:
                raise ConfigError(f"extra_body must be plain JSON ({one_line(error, 120)})") from None
            if not isinstance(self.extra_body, dict):
                raise ConfigError(f"extra_body must be a dict, got {type(self.extra_body).__name__}")
        if self.require_key and not self._key():
            raise ConfigError(f"an API key is required but the environment variable {self.api_key_env!r} is not set")
        self.stats = dict.fromkeys(("requests", "retries", "failures", "malformed",
                                    "prompt_tokens", "completion_tokens"), 0)
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        identity = f"openai-compatible:{self.base_url}:{self.model}"
        if self.extra_body:  # extra settings (seed, top_p, ...) change replies, so they split the cache
            digest = hashlib.sha256(json.dumps(self.extra_body, sort_keys=True).encode()).hexdigest()[:12]
            identity += f":extra={digest}"
        return identity

    def _key(self) -> str | None:
        # read per request, never stored: the object holds nothing that could leak the key
        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.stats[name] += amount

    def complete(self, requests: Sequence[ChatRequest], on_reply: OnReply | None = None) -> list[ChatReply]:
        """One reply per request, in order. ``on_reply(index, reply)`` (optional) is called from
        a worker thread as each reply arrives (the cache writes through it)."""
        requests = list(requests)
        if not requests:
            return []

        def run(index: int) -> ChatReply:
            reply = self._complete_one(requests[index])
            if on_reply is not None:
                on_reply(index, reply)
            return reply

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(run, range(len(requests))))

    def _complete_one(self, request: ChatRequest) -> ChatReply:
        try:
            body = json.dumps(self._payload(request)).encode()
        except (TypeError, ValueError) as error:
            self._count("failures")
            return ChatReply(text=None, error=f"cannot encode the request ({one_line(error, 120)})")
        key, error, attempt, delay = self._key(), "no attempt made", 0, 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(delay)
            self._count("requests")
            try:
                reply = self._attempt(body, key)
            except Exception as problem:  # never raise for a request: an unforeseen error is a failed reply
                error, retry, wait = f"unexpected error ({type(problem).__name__})", False, None
            else:
                if isinstance(reply, ChatReply):
                    self._count("prompt_tokens", reply.prompt_tokens)
                    self._count("completion_tokens", reply.completion_tokens)
                    return reply
                error, retry, wait = reply
            if not retry:
                break
            backoff = self.backoff_s * 2 ** min(attempt, 40) * (1 + random.uniform(0, 0.1))  # jitter: retries spread out
            delay = min(self.backoff_max_s, backoff if wait is None else wait)
        self._count("failures")
        if key:
            error = error.replace(key, "***")  # a server may echo the key back in its message
        suffix = f" (gave up after {attempt + 1} attempts)" if attempt else ""
        return ChatReply(text=None, error=one_line(error + suffix, 400))

    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        payload: dict[str, Any] = dict(self.extra_body or {})
        payload.update(model=self.model, max_tokens=request.max_tokens, temperature=request.temperature,
                       messages=[{"role": m.role, "content": m.content} for m in request.messages])
        if request.top_logprobs > 0:
            payload.update(logprobs=True, top_logprobs=request.top_logprobs)
        return payload

    def _attempt(self, body: bytes, key: str | None) -> ChatReply | tuple[str, bool, float | None]:
        """One HTTP attempt: the reply, or (error, retry it?, server's Retry-After)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        http = urllib.request.Request(url, data=body, headers=headers, method="POST")
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(http, timeout=self.timeout_s) as response:
                raw = response.read(MAX_REPLY_BYTES + 1)
        except urllib.error.HTTPError as reply:
            status, message = reply.code, _server_message(reply)
            retry = status == 429 or status >= 500
            return f"HTTP {status}: {message}", retry, _retry_after(reply.headers) if retry else None
        except urllib.error.URLError as problem:
            if isinstance(problem.reason, (TimeoutError, socket.timeout)):
                return f"timeout after {self.timeout_s} s", True, None
            return f"connection error ({one_line(str(problem.reason), 160)})", True, None
        except (TimeoutError, socket.timeout):
            return f"timeout after {self.timeout_s} s", True, None
        except Exception as problem:  # refused, reset, dropped mid-reply (http.client.HTTPException): retried
            return f"connection error ({type(problem).__name__}: {one_line(problem, 160)})", True, None
        try:
            return _parse_reply(raw)
        except _Malformed as problem:
            self._count("malformed")
            return f"malformed reply ({problem})", True, None


def _server_message(reply: urllib.error.HTTPError) -> str:
    """The first 200 characters of an error reply: its error.message if JSON, else its text."""
    try:
        text = reply.read(64 << 10).decode("utf-8", "replace")
    except Exception:  # the body of an error reply is a courtesy; its status is what counts
        return ""
    try:
        data = json.loads(text)
        error = data.get("error") if isinstance(data, dict) else None
        text = str(error.get("message", error) if isinstance(error, dict) else error or text)
    except ValueError:
        pass
    return one_line(text, 200)


def _retry_after(headers: Any) -> float | None:
    """Retry-After in seconds (an HTTP date is ignored: the backoff applies)."""
    try:
        value = float(headers.get("Retry-After"))
    except (TypeError, ValueError, AttributeError):
        return None
    return max(0.0, value) if value == value else None


def _parse_reply(raw: bytes) -> ChatReply:
    if len(raw) > MAX_REPLY_BYTES:
        raise _Malformed(f"body larger than {MAX_REPLY_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise _Malformed("body is not JSON") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Malformed("no choices")
    message = choices[0].get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise _Malformed("no message content")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return ChatReply(text=text, logprobs=_parse_logprobs(choices[0].get("logprobs")),
                     prompt_tokens=_count_of(usage.get("prompt_tokens")),
                     completion_tokens=_count_of(usage.get("completion_tokens")))


def _count_of(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _parse_logprobs(logprobs: Any) -> tuple[TokenLogprobs, ...] | None:
    """choices[0].logprobs.content as TokenLogprobs; None when absent or not in the known shape
    (logprobs are extra: a reply without usable ones is still a reply)."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return None
    try:
        tokens = []
        for item in content:
            token, logprob = str(item["token"]), float(item["logprob"])
            top = {str(alt["token"]): float(alt["logprob"]) for alt in item.get("top_logprobs") or ()}
            top.setdefault(token, logprob)  # the generated token is always among its alternatives
            tokens.append(TokenLogprobs(token, logprob, top))
        return tuple(tokens)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


class CachedBackend:
    """Any backend with an on-disk cache of its successful replies (see the module docstring)."""

    def __init__(self, inner: Backend, folder: str | Path, max_bytes: int = MAX_CACHE_BYTES) -> None:
        self.inner, self.folder, self.max_bytes = inner, Path(folder), max_bytes
        self.stats = {"hits": 0, "misses": 0, "write_errors": 0}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CachedBackend({self.inner!r}, folder={str(self.folder)!r})"

    @property
    def identity(self) -> str:
        return self.inner.identity

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def _load(self, key: str) -> ChatReply | None:
        try:
            reply = ChatReply.from_json(read_json(self.path(key), ValueError, self.max_bytes))
        except FileNotFoundError:
            return None
        except Exception:  # corrupt, truncated, hostile or unreadable: a miss, rewritten on success
            return None
        return replace(reply, cached=True) if isinstance(reply.text, str) else None

    def _store(self, key: str, reply: ChatReply) -> None:
        if reply.text is None:  # failures are not cached: a re-run asks again
            return
        try:
            write_text(self.path(key), json.dumps(replace(reply, cached=False).to_json()) + "\n")
        except (OSError, ValueError):  # a full disk costs the cache, not the reply
            with self._lock:
                self.stats["write_errors"] += 1

    def complete(self, requests: Sequence[ChatRequest], on_reply: OnReply | None = None) -> list[ChatReply]:
        requests = list(requests)
        identity = self.inner.identity
        keys = [request.key(identity) for request in requests]
        replies: list[ChatReply | None] = [self._load(key) for key in keys]
        missing: dict[str, list[int]] = {}  # key -> indices asking it (identical requests go once)
        for index, (key, reply) in enumerate(zip(keys, replies)):
            if reply is None:
                missing.setdefault(key, []).append(index)
            elif on_reply is not None:
                on_reply(index, reply)
        with self._lock:
            self.stats["hits"] += len(requests) - sum(map(len, missing.values()))
            self.stats["misses"] += sum(map(len, missing.values()))
        if not missing:
            return replies  # type: ignore[return-value]
        order = list(missing)

        def arrived(position: int, reply: ChatReply) -> None:
            self._store(order[position], reply)
            for index in missing[order[position]]:
                if on_reply is not None:
                    on_reply(index, reply)

        asked = [requests[missing[key][0]] for key in order]
        # write each reply as it arrives when the inner backend can say so, else after its batch
        streams = "on_reply" in inspect.signature(self.inner.complete).parameters
        fresh = self.inner.complete(asked, on_reply=arrived) if streams else self.inner.complete(asked)
        for position, (key, reply) in enumerate(zip(order, fresh)):
            if not streams:
                arrived(position, reply)
            for index in missing[key]:
                replies[index] = reply
        return replies  # type: ignore[return-value]
