"""The activation stage: text in, activations out.

It owns where activations come from (:class:`ActivationConfig`: model, corpus, context windows),
the held-out split (one context window in ``eval_every`` is never trained on), live harvesting
from the model, and filling and reading back the on-disk activation cache
(:class:`ActivationSource`). Every job that needs activations (train, sweep, suite, Jacobian
SAEs, eval, dashboard) builds them here.
"""

from .config import ActivationConfig
from .source import (ActivationSource, ReplayableStream, Split, context_size_for, default_site, load_source_model,
                     max_positions, split_windows)

__all__ = ["ActivationConfig", "ActivationSource", "ReplayableStream", "Split", "context_size_for", "default_site",
           "load_source_model", "max_positions", "split_windows"]
