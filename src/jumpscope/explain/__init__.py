"""Automated interpretability (SPEC 6): explain latents with an LLM and score the explanations.

- ``backend.py``: the one small interface (:class:`Backend`: ``complete(requests) -> replies``)
  and the request / reply types; ``client.py``: any OpenAI-compatible chat-completions endpoint
  (retries, backoff, bounded concurrency) and the on-disk cache; ``local.py``: a local
  transformers chat model.
- ``prompts.py``: the explainer's, detection's, fuzzing's and simulation's prompts and tolerant
  parsers; ``scoring.py``: the example split and the scorers.
- ``controls.py``: random-direction control latents; ``pipeline.py``: per-latent explain-and-score
  with resumable results; ``export.py``: CSV/JSON, score summaries, Neuronpedia's bulk layout.
"""

from .backend import Backend, ChatMessage, ChatReply, ChatRequest, TokenLogprobs
from .client import CachedBackend, OpenAICompatibleBackend
from .local import TransformersChatBackend
from .pipeline import AutointerpConfig, explain_latent, latent_tasks, run_latents

__all__ = ["Backend", "ChatMessage", "ChatReply", "ChatRequest", "TokenLogprobs", "CachedBackend",
           "OpenAICompatibleBackend", "TransformersChatBackend", "AutointerpConfig", "explain_latent",
           "latent_tasks", "run_latents"]
