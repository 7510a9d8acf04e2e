"""The one small interface every LLM backend implements, and the request and reply it passes.

A backend turns a :class:`ChatRequest` (chat messages plus sampling settings) into a
:class:`ChatReply`. Backends: :class:`~jumpscope.explain.client.OpenAICompatibleBackend` (any
chat-completions endpoint: hosted APIs, vLLM, llama.cpp's server, Ollama) and
:class:`~jumpscope.explain.local.TransformersChatBackend` (a local transformers chat model).
:class:`~jumpscope.explain.client.CachedBackend` wraps either with an on-disk cache.

A backend never raises for a reply it cannot use: a request that failed after every retry gives
``ChatReply(text=None, error=...)``; the caller counts it and goes on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

__all__ = ["ChatMessage", "ChatRequest", "ChatReply", "TokenLogprobs", "Backend"]


@dataclass(frozen=True)
class ChatMessage:
    """One chat message."""

    role: str
    """'system', 'user' or 'assistant'."""

    content: str
    """The message text."""


@dataclass(frozen=True)
class ChatRequest:
    """What to ask: messages and sampling settings (a backend fills in its own model name)."""

    messages: tuple[ChatMessage, ...]
    """The conversation, oldest first."""

    max_tokens: int = 256
    """Most tokens in the reply."""

    temperature: float = 0.0
    """Sampling temperature (0: greedy, so a cached reply is the reply)."""

    top_logprobs: int = 0
    """When > 0, ask for the reply's per-token log-probabilities with this many alternatives each
    (simulation scoring uses them where the backend returns them)."""

    def key(self, backend_id: str) -> str:
        """sha256 of the request and the backend's identity (model, endpoint): the cache key."""
        payload = json.dumps({"backend": backend_id, **asdict(self)}, sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token with its log-probability and the top alternatives at that position."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)
    """Alternative token string -> log-probability (the generated token included)."""


@dataclass(frozen=True)
class ChatReply:
    """The reply text (None when the request failed), per-token logprobs when asked for and
    given, token counts, and what went wrong if anything."""

    text: str | None
    logprobs: tuple[TokenLogprobs, ...] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    """Why there is no usable reply (after every retry), e.g. 'HTTP 500', 'timeout', 'malformed JSON'."""
    cached: bool = False
    """Served from the on-disk cache (no request made)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ChatReply":
        logprobs = data.get("logprobs")
        return cls(text=data.get("text"), prompt_tokens=int(data.get("prompt_tokens", 0)),
                   completion_tokens=int(data.get("completion_tokens", 0)), error=data.get("error"),
                   cached=bool(data.get("cached", False)),
                   logprobs=None if logprobs is None else tuple(
                       TokenLogprobs(str(t["token"]), float(t["logprob"]),
                                     {str(k): float(v) for k, v in (t.get("top") or {}).items()}) for t in logprobs))


@runtime_checkable
class Backend(Protocol):
    """An LLM that answers chat requests."""

    @property
    def identity(self) -> str:
        """What makes its replies differ from another backend's (model name, endpoint URL): part
        of every cache key."""
        ...

    def complete(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        """One reply per request, in order (a backend may run them concurrently). Never raises for
        a failed request: its reply has ``text=None`` and ``error`` set."""
        ...
