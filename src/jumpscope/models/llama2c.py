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

The tokenizer is :class:`jumpscope.models.llama2c_tokenizer.Llama2cTokenizer`.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .llama2c_tokenizer import Llama2cTokenizer

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
