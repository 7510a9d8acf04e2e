"""llama2.c checkpoints as a transformers ``LlamaForCausalLM`` plus a tokenizer.

Karpathy's llama2.c (MIT) stores small Llama-2 models such as the tinyllamas ``stories260K.bin``
in a "legacy v0" file: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len; a negative vocab_size means an untied classifier) followed by float32 tensors
token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, two legacy RoPE tables
(seq_len * head_size / 2 each, unused) and, when untied, the classifier (vocab, dim).
``load_llama2c`` maps this exactly onto transformers' Llama: llama2.c rotates interleaved pairs
(2i, 2i+1) where transformers rotates halves (i, i + head_size/2), so the rows of wq and wk are
permuted per head. The tokenizer file is int32 max_token_length then, per token, float32 score,
int32 byte length and the UTF-8 bytes (spaces stored as " ", BOS/EOS as "\\n<s>\\n"/"\\n</s>\\n").

``Llama2cTokenizer`` is a slow (pure Python) ``transformers`` tokenizer that reproduces run.c's
``encode`` exactly (dummy leading space, per-character lookup with ``<0xNN>`` byte fallback, then
repeatedly merge the adjacent pair whose concatenation scores highest, leftmost on ties) and its
``decode`` (byte pieces back to bytes; the leading space of the piece after BOS is dropped).
Token strings follow Hugging Face conventions: "\u2581" marks a space, specials are ``<unk>``,
``<s>`` (BOS, id 1) and ``</s>`` (EOS, id 2). There is no pad token (llama2.c has none); set
``tokenizer.pad_token = tokenizer.eos_token`` before padding batches. ``save_pretrained`` copies
the original tokenizer file, so ``Llama2cTokenizer.from_pretrained(folder)`` reloads it.
"""

from __future__ import annotations

import heapq
import inspect
import os
import re
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizer

__all__ = ["Llama2cTokenizer", "load_llama2c", "read_llama2c_header"]

_HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
_HEADER_BYTES = 28
_MAX_DIM = 1 << 20  # anything larger is surely not a llama2.c header


def read_llama2c_header(model_path: str | os.PathLike) -> dict:
    """Parse and validate the 7-int32 header; return it with ``shared_classifier`` and sizes.

    Raises ``ValueError`` for nonsense values and when the file size differs from what the header
    implies (naming the expected and actual byte counts).
    """
    path = Path(model_path)
    actual = path.stat().st_size
    if actual < _HEADER_BYTES:
        raise ValueError(f"{path}: {actual} bytes is too short for a llama2.c header ({_HEADER_BYTES} bytes)")
    h = dict(zip(_HEADER_FIELDS, (int(v) for v in np.fromfile(path, dtype="<i4", count=7))))
    h["shared_classifier"] = h["vocab_size"] > 0
    h["vocab_size"] = abs(h["vocab_size"])
    for k in _HEADER_FIELDS:
        if not 0 < h[k] <= _MAX_DIM:
            raise ValueError(f"{path}: not a llama2.c v0 checkpoint (header {k}={h[k]})")
    dim, hidden, n_layers = h["dim"], h["hidden_dim"], h["n_layers"]
    if dim % h["n_heads"] or h["n_heads"] % h["n_kv_heads"] or (dim // h["n_heads"]) % 2:
        raise ValueError(f"{path}: inconsistent llama2.c header: dim={dim}, n_heads={h['n_heads']}, "
                         f"n_kv_heads={h['n_kv_heads']} (need dim % n_heads == 0, n_heads % n_kv_heads == 0 "
                         "and an even head size)")
    head_size = dim // h["n_heads"]
    kv_dim = head_size * h["n_kv_heads"]
    n_floats = (h["vocab_size"] * dim + 2 * n_layers * dim + 2 * n_layers * dim * dim
                + 2 * n_layers * kv_dim * dim + 3 * n_layers * hidden * dim + dim + h["seq_len"] * head_size
                + (0 if h["shared_classifier"] else h["vocab_size"] * dim))
    expected = _HEADER_BYTES + 4 * n_floats
    if actual != expected:
        raise ValueError(f"{path}: file size {actual} bytes does not match the {expected} bytes its llama2.c "
                         f"v0 header implies ({'truncated' if actual < expected else 'trailing data'}; "
                         f"header {', '.join(f'{k}={h[k]}' for k in _HEADER_FIELDS)})")
    h.update(head_size=head_size, kv_dim=kv_dim, n_floats=n_floats)
    return h


def _llama_config(h: dict) -> LlamaConfig:
    kw = dict(vocab_size=h["vocab_size"], hidden_size=h["dim"], intermediate_size=h["hidden_dim"],
              num_hidden_layers=h["n_layers"], num_attention_heads=h["n_heads"],
              num_key_value_heads=h["n_kv_heads"], max_position_embeddings=h["seq_len"], rms_norm_eps=1e-5,
              tie_word_embeddings=h["shared_classifier"], hidden_act="silu", attention_bias=False,
              mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers >= 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    else:
        kw["rope_theta"] = 10000.0
    return LlamaConfig(**kw)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of one head from interleaved RoPE pairs (2i, 2i+1) to halves (i, i + head_size/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_llama2c(model_path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32):
    """Load a llama2.c v0 checkpoint as ``(LlamaForCausalLM in eval mode, Llama2cTokenizer | None)``.

    Without ``tokenizer_path``, ``tokenizer.bin`` or ``tok{vocab_size}.bin`` beside the model is used
    when present, else the tokenizer is ``None``. The tokenizer's vocabulary must match the model's.
    """
    h = read_llama2c_header(model_path)
    flat = torch.from_numpy(np.fromfile(model_path, dtype="<f4", offset=_HEADER_BYTES))
    L, dim, hid, kv, vocab = h["n_layers"], h["dim"], h["hidden_dim"], h["kv_dim"], h["vocab_size"]
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        t = flat[pos:pos + n].view(*shape)
        pos += n
        return t

    emb, rms_att, wq, wk = take(vocab, dim), take(L, dim), take(L, dim, dim), take(L, kv, dim)
    wv, wo, rms_ffn = take(L, kv, dim), take(L, dim, dim), take(L, dim)
    w1, w2, w3, rms_final = take(L, hid, dim), take(L, dim, hid), take(L, hid, dim), take(dim)
    take(h["seq_len"] * h["head_size"])  # the two legacy RoPE tables (freq_cis_real, freq_cis_imag)
    classifier = emb if h["shared_classifier"] else take(vocab, dim)
    assert pos == flat.numel()

    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final, "lm_head.weight": classifier}
    for i in range(L):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": rms_att[i], p + "post_attention_layernorm.weight": rms_ffn[i],
                   p + "self_attn.q_proj.weight": _unpermute(wq[i], h["n_heads"]),
                   p + "self_attn.k_proj.weight": _unpermute(wk[i], h["n_kv_heads"]),
                   p + "self_attn.v_proj.weight": wv[i], p + "self_attn.o_proj.weight": wo[i],
                   p + "mlp.gate_proj.weight": w1[i], p + "mlp.down_proj.weight": w2[i],
                   p + "mlp.up_proj.weight": w3[i]})
    model = LlamaForCausalLM(_llama_config(h))
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True)
    if h["shared_classifier"]:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(dtype).eval()
    model.config.name_or_path = str(model_path)

    if tokenizer_path is None:
        here = Path(model_path).parent
        tokenizer_path = next((p for p in (here / "tokenizer.bin", here / f"tok{vocab}.bin") if p.is_file()), None)
    tokenizer = None if tokenizer_path is None else Llama2cTokenizer(str(tokenizer_path), vocab_size=vocab)
    return model, tokenizer


_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_SPECIAL_NAMES = {0: "<unk>", 1: "<s>", 2: "</s>"}


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
        """run.c's encode without BOS/EOS: ids for ``text`` (empty text gives no ids)."""
        if not text:
            return []
        space = self._raw_to_id.get(b" ")
        if space is None:
            raise ValueError("the vocabulary has no ' ' piece for llama2.c's dummy prefix")
        ids = [space]
        for ch in text:
            b = ch.encode("utf-8", "surrogatepass")
            i = self._raw_to_id.get(b)
            ids.extend([i] if i is not None else [3 + x for x in b])
        # Greedy merges: best score first, leftmost on ties (run.c scans left to right with a strict >),
        # done with a heap of candidate pairs keyed by the left node's original index.
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
