"""llama2.c loader and tokenizer: synthetic v0 checkpoints against a direct run.c-style forward pass,
run.c's greedy-merge encoding, and (slow) the real stories260K where the shared data is present."""

import hashlib
import math
import os
import random
import struct
from pathlib import Path

import pytest
import torch

from jumpscope.models.llama2c import Llama2cTokenizer, load_llama2c, read_llama2c_header
from llama2c_files import PIECES, make_weights, write_checkpoint, write_tokenizer

CFG = dict(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, seq_len=16)


def reference_forward(w, cfg, tokens):
    """llama2.c run.c's forward for all positions, in float64 plain torch."""
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in w.items()}
    d, nh, nkv = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hs, T = d // nh, len(tokens)
    kv_dim = hs * nkv

    def rmsnorm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * weight

    def rope(v, width):  # run.c: for even i, head_dim = i % head_size, rotate (v[i], v[i+1])
        out = v.clone()
        for pos in range(T):
            for i in range(0, width, 2):
                val = pos * (1.0 / 10000.0 ** ((i % hs) / hs))
                fcr, fci = math.cos(val), math.sin(val)
                v0, v1 = v[pos, i], v[pos, i + 1]
                out[pos, i], out[pos, i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
        return out

    x = t["emb"][torch.tensor(tokens)]
    for layer in range(cfg["n_layers"]):
        xb = rmsnorm(x, t["rms_att"][layer])
        q, k, v = xb @ t["wq"][layer].T, xb @ t["wk"][layer].T, xb @ t["wv"][layer].T
        q, k = rope(q, d), rope(k, kv_dim)
        att_out = torch.zeros(T, d, dtype=torch.float64)
        for h in range(nh):
            kvh = h // (nh // nkv)
            qh, kh, vh = q[:, h * hs:(h + 1) * hs], k[:, kvh * hs:(kvh + 1) * hs], v[:, kvh * hs:(kvh + 1) * hs]
            scores = qh @ kh.T / math.sqrt(hs)
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            att_out[:, h * hs:(h + 1) * hs] = torch.softmax(scores, -1) @ vh
        x = x + att_out @ t["wo"][layer].T
        xb = rmsnorm(x, t["rms_ffn"][layer])
        hb = torch.nn.functional.silu(xb @ t["w1"][layer].T) * (xb @ t["w3"][layer].T)
        x = x + hb @ t["w2"][layer].T
    return rmsnorm(x, t["rms_final"]) @ t["cls"].T


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_llama2c_forward(tmp_path, tied):
    w = make_weights(CFG, tied, seed=1 + tied)
    path = tmp_path / "model.bin"
    write_checkpoint(path, CFG, w, tied)
    model, tok = load_llama2c(path)
    assert tok is None
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.max_position_embeddings) == (32, 48, 2, 4, 2, 40, 16)
    assert c.tie_word_embeddings == tied and c.bos_token_id == 1 and c.eos_token_id == 2
    same = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert same == tied
    tokens = [1, 5, 39, 7, 7, 0, 22, 13, 2, 30, 11, 4, 17, 9, 25, 3]
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double()
    want = reference_forward(w, CFG, tokens)
    assert got.shape == (16, 40)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Greedy generation with the KV cache follows the reference argmax step by step.
    with torch.no_grad():
        out = model.generate(torch.tensor([[1, 5]]), max_new_tokens=6, do_sample=False, pad_token_id=2,
                             eos_token_id=None)[0].tolist()
    for n in range(2, len(out)):
        assert out[n] == int(reference_forward(w, CFG, out[:n])[-1].argmax())


def test_bfloat16_dtype(tmp_path):
    write_checkpoint(tmp_path / "m.bin", CFG, make_weights(CFG, True), True)
    model, _ = load_llama2c(tmp_path / "m.bin", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits.float()).all()


def test_bad_files_raise_clear_errors(tmp_path):
    path = tmp_path / "m.bin"
    write_checkpoint(path, CFG, make_weights(CFG, False), False)
    size = path.stat().st_size
    assert read_llama2c_header(path)["shared_classifier"] is False
    data = path.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match=rf"{size - 4} bytes.*{size} bytes.*truncated"):
        load_llama2c(tmp_path / "short.bin")
    (tmp_path / "long.bin").write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match=rf"{size + 8} bytes.*{size} bytes"):
        load_llama2c(tmp_path / "long.bin")
    (tmp_path / "tiny.bin").write_bytes(data[:10])
    with pytest.raises(ValueError, match="too short"):
        load_llama2c(tmp_path / "tiny.bin")
    for bad in ({"n_heads": 0}, {"n_heads": 5}, {"n_kv_heads": 3}, {"seq_len": -1}, {"dim": 1 << 30}):
        header = [bad.get(k, CFG[k]) for k in CFG]
        (tmp_path / "bad.bin").write_bytes(struct.pack("<7i", *header) + data[28:])
        with pytest.raises(ValueError, match="llama2.c"):
            load_llama2c(tmp_path / "bad.bin")


# --- tokenizer ---------------------------------------------------------------------------------
def runc_encode(toks, text):
    """Literal transliteration of run.c's encode (no BOS/EOS), quadratic on purpose."""
    lookup = {}
    for i, (t, _) in enumerate(toks):
        lookup.setdefault(t, i)
    ids = [lookup[b" "]] if text else []
    for ch in text:
        b = ch.encode()
        ids += [lookup[b]] if b in lookup else [x + 3 for x in b]
    while True:
        best, best_id, best_idx = -1e10, -1, -1
        for i in range(len(ids) - 1):
            m = lookup.get(toks[ids[i]][0] + toks[ids[i + 1]][0], -1)
            if m != -1 and toks[m][1] > best:
                best, best_id, best_idx = toks[m][1], m, i
        if best_idx == -1:
            return ids
        ids[best_idx:best_idx + 2] = [best_id]


@pytest.fixture
def tok_and_pieces(tmp_path):
    toks = write_tokenizer(tmp_path / "tok.bin")
    return Llama2cTokenizer(str(tmp_path / "tok.bin")), toks


def test_greedy_merges_and_byte_fallback(tok_and_pieces):
    tok, _ = tok_and_pieces
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token) == (1, 2, 0, None)
    assert tok.vocab_size == len(tok) == 259 + len(PIECES)
    # "bc" (-3) beats "ab" (-9) although "ab" is leftmost, then " a" (-8); "aa" ties resolve leftmost
    assert tok.tokenize("abc") == ["\u2581a", "bc"]
    assert tok.tokenize("aaa") == ["\u2581", "aa", "a"]
    # "lo", "he", "llo", " he", " hello" in score order; "hell" stops at " he" + "ll"
    assert tok.tokenize("hello") == ["\u2581hello"]
    assert tok.tokenize("hell") == ["\u2581he", "ll"]
    assert tok.convert_ids_to_tokens(tok.encode("\u2581", add_special_tokens=False)) == ["\u2581", "<piece278>"]
    assert tok.tokenize("hé,") == ["\u2581", "h", "<0xC3>", "<0xA9>", ","]
    assert tok.encode("hé", add_special_tokens=False) == [259, 259 + 4, 3 + 0xC3, 3 + 0xA9]
    assert tok.encode("ab")[0] == 1 and tok.encode("ab", add_special_tokens=False)[0] != 1
    assert tok.tokenize("") == [] and tok.encode("") == [1]
    assert tok.tokenize("<s>") == ["\u2581", "<0x3C>", "<0x73>", "<0x3E>"]  # plain text, as in run.c
    assert tok.convert_ids_to_tokens([1, 2, 0, 3 + 65]) == ["<s>", "</s>", "<unk>", "<0x41>"]


def test_matches_runc_encode_on_random_text(tok_and_pieces):
    tok, toks = tok_and_pieces
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abchelo ,é\u2581zx") for _ in range(rng.randint(0, 30)))
        assert tok.encode(text, add_special_tokens=False) == runc_encode(toks, text), text


def test_word_by_word_encoding_equals_runc_and_a_vocabulary_that_joins_words_falls_back(tmp_path, monkeypatch):
    # no test piece holds an inner space, so the tokenizer merges word by word (with a cache of
    # words, here cleared every 3 words); a piece with an inner space ("a b", two spaces) can join a
    # space to what precedes it, so that vocabulary is merged over the whole text, as run.c does
    import jumpscope.models.llama2c_tokenizer as module

    monkeypatch.setattr(module, "_WORD_CACHE_SIZE", 3)
    rng = random.Random(1)
    texts = ["".join(rng.choice("abchelo ,\né  ") for _ in range(rng.randint(0, 40))) for _ in range(300)]
    texts += [" leading", "trailing ", "  two  spaces  ", "a b a b", " "]
    for name, pieces, by_word in (("words", PIECES, True),
                                  ("joins", PIECES + [("a b", -0.5), ("  ", -0.7), ("o ,", -0.6)], False)):
        toks = write_tokenizer(tmp_path / f"{name}.bin", pieces)
        tok = Llama2cTokenizer(str(tmp_path / f"{name}.bin"))
        assert tok._words_are_independent is by_word
        for text in texts + texts[:20]:  # the second pass reads the word cache
            assert tok.encode(text, add_special_tokens=False) == runc_encode(toks, text), (name, text)


def test_decode_round_trip(tok_and_pieces):
    tok, _ = tok_and_pieces
    for text in ["hello, abc", "hé hello", "  a  b ", "日本 abc", "\u2581a"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == 1
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids) == "<s>" + text
        # without BOS, llama2.c keeps the dummy-prefix space
        assert tok.decode(ids[1:]) == " " + text
    batch = tok(["abc", "hello"])["input_ids"]
    assert tok.batch_decode(batch, skip_special_tokens=True) == ["abc", "hello"]
    assert tok.convert_tokens_to_string(tok.tokenize("hé")) == " hé"


def test_tokenizer_batch_padding_and_save(tok_and_pieces, tmp_path):
    tok, _ = tok_and_pieces
    tok.pad_token = tok.eos_token
    enc = tok(["abc", "hello, hello"], padding=True, return_tensors="pt")
    assert enc["input_ids"].shape == (2, 4) and enc["attention_mask"].sum(1).tolist() == [3, 4]
    assert enc["input_ids"][0].tolist() == [1, 259 + 12, 259 + 10, 2]
    tok.save_pretrained(tmp_path / "saved")
    again = Llama2cTokenizer.from_pretrained(tmp_path / "saved")
    assert again.encode("hé hello") == tok.encode("hé hello")


def test_tokenizer_validation(tmp_path):
    write_tokenizer(tmp_path / "tok.bin")
    with pytest.raises(ValueError, match="vocab_size is 40"):
        Llama2cTokenizer(str(tmp_path / "tok.bin"), vocab_size=40)
    data = (tmp_path / "tok.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match="truncated"):
        Llama2cTokenizer(str(tmp_path / "cut.bin"))
    # model + tokenizer vocabularies must agree
    write_checkpoint(tmp_path / "m.bin", CFG, make_weights(CFG, True), True)
    with pytest.raises(ValueError, match="vocab_size"):
        load_llama2c(tmp_path / "m.bin", tmp_path / "tok.bin")


# --- the real stories260K (slow; skipped where the shared data is absent) ---------------------------
DATA = Path(os.environ.get("JUMPSCOPE_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
SHA256 = {"stories260k/stories260K.bin": "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
          "stories260k/tok512.bin": "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
          "text/tinystories_cased.txt": "727e8b228375be3075114c20729c93ed6e81ae5d8fe7faf7cb54b304f0322d70"}


def mean_next_token_loss(model, ids, window):
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[s:s + window + 1]])
        with torch.no_grad():
            logits = model(chunk[:, :-1]).logits[0]
        total += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return total / count


@pytest.mark.slow
def test_real_stories260k():
    if not (DATA / "stories260k").is_dir():
        pytest.skip(f"shared data not found at {DATA} (set JUMPSCOPE_SHARED_DATA)")
    for rel, digest in SHA256.items():
        assert hashlib.sha256((DATA / rel).read_bytes()).hexdigest() == digest, f"{rel}: sha256 mismatch"
    model, tok = load_llama2c(DATA / "stories260k" / "stories260K.bin", DATA / "stories260k" / "tok512.bin")
    out = model.generate(**tok("", return_tensors="pt"), max_new_tokens=40, do_sample=False, pad_token_id=2)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily"), text
    ids = tok((DATA / "text" / "tinystories_cased.txt").read_text()[:12000])["input_ids"][:2001]
    assert len(ids) == 2001
    loss = mean_next_token_loss(model, ids, model.config.max_position_embeddings)
    assert 1.0 < loss < 2.2, loss
