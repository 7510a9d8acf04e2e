"""The llama2.c tokenizer as a transformers tokenizer.

``Llama2cTokenizer`` is a pure-Python ("slow" in transformers' terms, about 7 MB/s on TinyStories
with its word cache) ``transformers`` tokenizer that reproduces run.c's ``encode`` exactly (dummy leading space, per-character lookup with ``<0xNN>`` byte fallback, then
repeatedly merge the adjacent pair whose concatenation scores highest, leftmost on ties) and its
``decode`` (byte pieces back to bytes; the leading space of the piece after BOS is dropped).
Token strings follow Hugging Face conventions: "\u2581" marks a space, specials are ``<unk>``,
``<s>`` (BOS, id 1) and ``</s>`` (EOS, id 2). There is no pad token (llama2.c has none); set
``tokenizer.pad_token = tokenizer.eos_token`` before padding batches. ``save_pretrained`` copies
the original tokenizer file, so ``Llama2cTokenizer.from_pretrained(folder)`` reloads it.
"""

from __future__ import annotations

import heapq
import os
import re
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizer

__all__ = ["Llama2cTokenizer"]

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_SPECIAL_NAMES = {0: "<unk>", 1: "<s>", 2: "</s>"}
_WORD_START = re.compile(r"(?= )")  # splits before every space
_WORD_CACHE_SIZE = 1 << 16  # words kept per tokenizer (cleared when full)


def _read_tokenizer_file(path: str | os.PathLike) -> tuple[list[bytes], list[float]]:
    data = Path(path).read_bytes()
    if len(data) < 4 or int(np.frombuffer(data, "<i4", 1)[0]) < 0:
        raise ValueError(f"{path}: not a llama2.c tokenizer file")
    pieces, scores, off = [], [], 4
    while off < len(data):
        if off + 8 > len(data):
            raise ValueError(f"{path}: truncated llama2.c tokenizer file at byte {off} (token {len(pieces)})")
        score = float(np.frombuffer(data, "<f4", 1, off)[0])
        n = int(np.frombuffer(data, "<i4", 1, off + 4)[0])
        if n < 0 or off + 8 + n > len(data):
            raise ValueError(f"{path}: bad or truncated piece of length {n} at byte {off} (token {len(pieces)})")
        pieces.append(data[off + 8:off + 8 + n])
        scores.append(score)
        off += 8 + n
    return pieces, scores


class Llama2cTokenizer(PreTrainedTokenizer):
    """Slow tokenizer for llama2.c ``tokenizer.bin`` files, matching run.c's encode/decode exactly."""

    vocab_files_names = {"vocab_file": "tokenizer.bin"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, vocab_size: int | None = None, add_bos_token: bool = True,
                 add_eos_token: bool = False, **kwargs):
        pieces, scores = _read_tokenizer_file(vocab_file)
        if vocab_size is not None and len(pieces) != vocab_size:
            raise ValueError(f"{vocab_file}: {len(pieces)} tokens, but the model's vocab_size is {vocab_size}")
        if len(pieces) < 259 or any(pieces[3 + b] != b"<0x%02X>" % b for b in range(256)):
            raise ValueError(f"{vocab_file}: expected <unk>, <s>, </s> then the 256 byte pieces <0x00>..<0xFF>")
        self.vocab_file = str(vocab_file)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self._raw, self._scores = pieces, scores
        self._words_are_independent = not any(b" " in raw[1:] for raw in pieces)
        self._word_ids: dict[str, list[int]] = {}
        self._raw_to_id: dict[bytes, int] = {}
        self._tokens: list[str] = []
        self._token_to_id: dict[str, int] = {}
        self._byte_of: dict[int, int] = {}
        for i, raw in enumerate(pieces):
            self._raw_to_id.setdefault(raw, i)
            m = _BYTE_PIECE.fullmatch(raw)
            if m:
                self._byte_of[i] = int(m.group(1), 16)
            tok = _SPECIAL_NAMES.get(i) or raw.decode("utf-8", "backslashreplace").replace(" ", "\u2581")
            if tok in self._token_to_id:  # e.g. a literal "\u2581" piece: keep token strings one-to-one
                tok = f"<piece{i}>"
            self._tokens.append(tok)
            self._token_to_id[tok] = i
        for k, v in dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False).items():
            kwargs.setdefault(k, v)
        super().__init__(vocab_file=self.vocab_file, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._raw)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    # --- encoding (run.c `encode`) ---
    def encode_llama2c(self, text: str) -> list[int]:
        """run.c's encode without BOS/EOS: ids for ``text`` (empty text gives no ids).

        Where no piece holds a space after its first byte (sentencepiece's vocabularies, tok512),
        no merge can join a space to what precedes it, so the text is merged word by word (each
        starting at a space) with the same result, and repeated words come from a cache."""
        if not text:
            return []
        if self._raw_to_id.get(b" ") is None:
            raise ValueError("the vocabulary has no ' ' piece for llama2.c's dummy prefix")
        text = " " + text  # run.c's dummy prefix
        if not self._words_are_independent:
            return self._merged(text)
        ids: list[int] = []
        cache = self._word_ids
        for word in _WORD_START.split(text):
            if not word:
                continue
            found = cache.get(word)
            if found is None:
                if len(cache) >= _WORD_CACHE_SIZE:
                    cache.clear()
                found = cache[word] = self._merged(word)
            ids.extend(found)
        return ids

    def _merged(self, text: str) -> list[int]:
        """Per-character ids of ``text`` (byte fallback), then run.c's greedy merges: best score
        first, leftmost on ties (run.c scans left to right with a strict >), done with a heap of
        candidate pairs keyed by the left node's original index."""
        ids = []
        for ch in text:
            b = ch.encode("utf-8", "surrogatepass")
            i = self._raw_to_id.get(b)
            ids.extend([i] if i is not None else [3 + x for x in b])
        n, raw, lookup, scores = len(ids), self._raw, self._raw_to_id, self._scores
        nxt, prv, alive, heap = list(range(1, n)) + [-1], list(range(-1, n - 1)), [True] * n, []

        def push(i):
            j = nxt[i]
            if j != -1:
                m = lookup.get(raw[ids[i]] + raw[ids[j]])
                if m is not None and scores[m] > -1e10:  # run.c starts from best_score = -1e10
                    heapq.heappush(heap, (-scores[m], i, ids[i], j, ids[j], m))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, a, j, b, m = heapq.heappop(heap)
            if not (alive[i] and alive[j] and nxt[i] == j and ids[i] == a and ids[j] == b):
                continue
            ids[i], alive[j], nxt[i] = m, False, nxt[j]
            if nxt[j] != -1:
                prv[nxt[j]] = i
            if prv[i] != -1:
                push(prv[i])
            push(i)
        return [t for t, keep in zip(ids, alive) if keep]

    def tokenize(self, text: str, **kwargs) -> list[str]:
        # Like run.c, special-token text such as "<s>" inside ``text`` is encoded as plain text.
        return [self._tokens[i] for i in self.encode_llama2c(text)]

    def _tokenize(self, text, **kwargs):
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self._token_to_id.get(token, 0)

    def _convert_id_to_token(self, index: int) -> str:
        return self._tokens[index]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos, eos = [1] if self.add_bos_token else [], [2] if self.add_eos_token else []
        out = bos + list(token_ids_0) + eos
        return out if token_ids_1 is None else out + bos + list(token_ids_1) + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [int(t in (0, 1, 2)) for t in list(token_ids_0) + list(token_ids_1 or [])]
        bos, eos = [1] if self.add_bos_token else [], [1] if self.add_eos_token else []
        out = bos + [0] * len(token_ids_0) + eos
        return out if token_ids_1 is None else out + bos + [0] * len(token_ids_1) + eos

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # --- decoding (run.c `decode`) ---
    def _ids_to_text(self, ids, skip_special_tokens: bool = False) -> str:
        out, prev = bytearray(), None
        for t in ids:
            t = int(t)
            if not 0 <= t < len(self._raw):
                raise ValueError(f"token id {t} is outside the vocabulary (size {len(self._raw)})")
            if t in _SPECIAL_NAMES:
                if not skip_special_tokens:
                    out += _SPECIAL_NAMES[t].encode()
            elif t in self._byte_of:
                out.append(self._byte_of[t])
            else:
                piece = self._raw[t]
                out += piece[1:] if prev == 1 and piece.startswith(b" ") else piece
            prev = t
        return out.decode("utf-8", "replace")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._ids_to_text([self._convert_token_to_id(t) for t in tokens])

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        text = self._ids_to_text(ids, skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean else text

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        dest = Path(save_directory) / name
        if Path(self.vocab_file).resolve() != dest.resolve():
            dest.write_bytes(Path(self.vocab_file).read_bytes())
        return (str(dest),)
