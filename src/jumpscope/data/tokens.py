"""Pack documents into fixed-length token windows, framed by the model's own special tokens.

Documents are tokenized in batches **without** special tokens, joined into one stream with a
separator token between consecutive documents, and cut into windows of ``context_size`` tokens.

The framing rule (:func:`framing`), so that each window looks the way the model expects an input:

* **encoder-style** (the tokenizer has a CLS token, and no BOS or a BOS equal to CLS: BERT,
  RoBERTa, ...): ``[CLS] body [SEP]``, the SEP only when the tokenizer has one;
* **decoder-style with BOS** (the tokenizer puts its BOS in front of text itself: Llama, Gemma,
  llama2.c; or it declares a BOS and has no ``<|endoftext|>`` token): ``[BOS] body``, documents
  joined by EOS;
* **decoder-style without BOS** (no BOS, or a declared BOS it never adds, which is then a chat-turn
  marker: SmolLM2-Instruct declares ``<|im_start|>``): every document starts after the *document
  token* the model was pretrained with, ``<|endoftext|>`` when the vocabulary has it (SmolLM2,
  GPT-2, Qwen), else EOS: ``[DOC] body``, documents joined by DOC;
* neither: ``body`` alone. ``add_bos=False`` also gives ``body`` alone, whatever the tokenizer.

Otherwise the separator is EOS, else SEP (BERT has no EOS), else nothing. A long document simply
continues into the next window; empty documents are skipped. :func:`encode_prompt` frames a
prompt (steering, concept texts) with the same first token, so they look like training windows.

``train_mask`` is False at framing, separator and pad positions, and at any content position that
holds one of the tokenizer's BOS/EOS/PAD/CLS/SEP/document ids (a document quoting ``<|endoftext|>`` is
tokenized into that special token): those activations are not SAE training data.

The final partial window is dropped by default: every window then holds exactly ``context_size``
real tokens, no padding goes through the model and no attention mask is needed, and windows stay
interchangeable; the cost is at most one window of tokens per pass over the corpus.
``keep_last=True`` pads it instead (pad positions masked out of ``train_mask`` and
``attention_mask``; the pad id is the tokenizer's PAD, else EOS, else 0).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

_WARNED: set[tuple] = set()


@dataclass(frozen=True)
class Framing:
    """Which token ids frame each window and join documents (None: no such token)."""

    first: int | None
    last: int | None
    separator: int | None
    pad: int
    special_ids: tuple[int, ...]
    """Ids never trained on: the tokenizer's BOS, EOS, PAD, CLS, SEP and document token that exist."""


@dataclass(frozen=True)
class TokenWindow:
    """One packed window: ``input_ids`` LongTensor [T]; ``train_mask`` and ``attention_mask`` BoolTensor [T]."""

    input_ids: Tensor
    train_mask: Tensor
    attention_mask: Tensor


def _token_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, f"{name}_token_id", None)
    return value if isinstance(value, int) else None


# Spellings of the token that separates pretraining documents in tokenizers without a BOS of their own.
DOCUMENT_TOKENS = ("<|endoftext|>",)


def _prepends_bos(tokenizer: Any, bos: int) -> bool:
    """Whether the tokenizer itself puts BOS in front of text (Llama's ``<s>``); SmolLM2-Instruct
    declares ``<|im_start|>`` as BOS but never adds it: there it marks a chat turn."""
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # a tokenizer that cannot be probed keeps its declared BOS
        return True
    return bool(ids) and ids[0] == bos


def document_token(tokenizer: Any) -> int | None:
    """The id of a ``<|endoftext|>``-style document token in the vocabulary, or None."""
    vocab = getattr(tokenizer, "get_vocab", None)
    try:
        vocab = vocab() if callable(vocab) else {}
    except Exception:
        vocab = {}
    return next((vocab[t] for t in DOCUMENT_TOKENS if isinstance(vocab.get(t), int)), None)


def framing(tokenizer: Any, add_bos: bool = True) -> Framing:
    """The framing of windows for ``tokenizer`` (see the module docstring for the rule). Every path
    that feeds text to the model (training and held-out windows, dashboards, concepts, steering
    prompts) takes its framing from here."""
    bos, eos, pad, cls, sep = (_token_id(tokenizer, n) for n in ("bos", "eos", "pad", "cls", "sep"))
    first = last = doc = None
    separator = eos if eos is not None else sep
    if cls is not None and (bos is None or bos == cls):
        first, last = cls, sep
    elif bos is not None and _prepends_bos(tokenizer, bos):
        first = bos
    else:
        doc = document_token(tokenizer)
        doc = eos if doc is None and bos is None else doc
        if doc is None:
            first = bos  # a declared BOS it does not add, and no document token: still the best start
        else:
            first = separator = doc
    if not add_bos:
        first = last = None
    pad_id = pad if pad is not None else eos if eos is not None else 0
    special = tuple(sorted({i for i in (bos, eos, pad, cls, sep, doc) if i is not None}))
    return Framing(first, last, separator, pad_id, special)


def encode_prompt(tokenizer: Any, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of ``text`` framed as a window starts (the framing's first token, then the text):
    a prompt then begins the way every training window does."""
    frame = framing(tokenizer, add_bos)
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([frame.first] if frame.first is not None else []) + list(body)


def pack_tokens(tokenizer: Any, documents: Iterable[str], context_size: int, *, add_bos: bool = True,
                batch_documents: int = 64, keep_last: bool = False,
                max_positions: int | None = None) -> Iterator[TokenWindow]:
    """Tokenize ``documents`` with a Hugging Face tokenizer (fast or slow) and yield packed windows.

    Every window has exactly ``context_size`` tokens. ``max_positions`` (the model's maximum
    position count, e.g. ``config.max_position_embeddings``) makes a larger ``context_size`` an
    error; a tokenizer ``model_max_length`` below ``context_size`` gives a warning (once).
    Deterministic: the same documents and tokenizer always give the same windows. The arguments
    are checked at the call; documents are read lazily, ``batch_documents`` at a time.
    """
    frame = framing(tokenizer, add_bos)
    n_frame = (frame.first is not None) + (frame.last is not None)
    if not isinstance(context_size, int) or context_size <= n_frame:
        raise ValueError(f"context_size must be an int above {n_frame} (the framing tokens), got {context_size!r}")
    if max_positions is not None and context_size > max_positions:
        raise ValueError(f"context_size {context_size} exceeds the model's maximum positions ({max_positions}); "
                         f"use context_size <= {max_positions}")
    if batch_documents < 1:
        raise ValueError(f"batch_documents must be >= 1, got {batch_documents}")
    _check_model_max_length(tokenizer, context_size)
    return _pack(tokenizer, iter(documents), context_size, frame, context_size - n_frame, batch_documents, keep_last)


def _pack(tokenizer: Any, docs: Iterator[str], context_size: int, frame: Framing, body: int,
          batch_documents: int, keep_last: bool) -> Iterator[TokenWindow]:
    special = torch.tensor(frame.special_ids, dtype=torch.long)
    buffer: list[int] = []
    started = False
    while batch := list(itertools.islice(docs, batch_documents)):
        if not all(isinstance(d, str) for d in batch):
            bad = next(d for d in batch if not isinstance(d, str))
            raise TypeError(f"documents must be str, got {type(bad).__name__}")
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False,
                            return_token_type_ids=False, verbose=False)["input_ids"]
        for ids in encoded:
            if not ids:
                continue
            if started and frame.separator is not None:
                buffer.append(frame.separator)
            buffer.extend(ids)
            started = True
        pos = 0  # consume with an offset, then compact once: no quadratic deletes on long documents
        while len(buffer) - pos >= body:
            yield _window(buffer[pos:pos + body], frame, context_size, special)
            pos += body
        del buffer[:pos]
    if keep_last and buffer:
        yield _window(buffer, frame, context_size, special)


def _window(body: list[int], frame: Framing, context_size: int, special: Tensor) -> TokenWindow:
    ids = ([frame.first] if frame.first is not None else []) + body
    ids += [frame.last] if frame.last is not None else []
    n_real = len(ids)
    input_ids = torch.full((context_size,), frame.pad, dtype=torch.long)
    input_ids[:n_real] = torch.tensor(ids, dtype=torch.long)
    attention_mask = torch.zeros(context_size, dtype=torch.bool)
    attention_mask[:n_real] = True
    train_mask = attention_mask & ~torch.isin(input_ids, special)
    return TokenWindow(input_ids, train_mask, attention_mask)


def _check_model_max_length(tokenizer: Any, context_size: int) -> None:
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit >= context_size:
        return
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), limit, context_size)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"context_size {context_size} is above the tokenizer's model_max_length ({limit}): the "
                      f"tokenizer would truncate inputs this long, so the model may not have been trained on "
                      f"windows of {context_size} tokens (packing here does not truncate)", stacklevel=3)


def batch_windows(windows: Iterable[TokenWindow], batch_size: int, *, drop_last: bool = False,
                  with_attention_mask: bool = False) -> Iterator[tuple[Tensor, ...]]:
    """Stack windows into ``(input_ids [B, T], train_mask [B, T])`` batches, in order.

    The last batch may be smaller unless ``drop_last``. ``with_attention_mask=True`` adds a third
    element, ``attention_mask [B, T]`` (all True unless ``keep_last`` padded the final window).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    group: list[TokenWindow] = []
    for window in itertools.chain(windows, [None]):
        if window is not None:
            group.append(window)
        if group and (len(group) == batch_size or (window is None and not drop_last)):
            out = (torch.stack([w.input_ids for w in group]), torch.stack([w.train_mask for w in group]))
            yield (out + (torch.stack([w.attention_mask for w in group]),)) if with_attention_mask else out
            group = []
