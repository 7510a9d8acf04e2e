"""Packing documents into token windows: exact window length, framing by the model's own special
tokens (BOS for decoders, CLS ... SEP for BERT-style), train masks, lossless content order,
padding of the last window, batching, and the context-size checks. Tokenizers are built locally."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

from jumpscope.data.tokens import TokenWindow, batch_windows, encode_prompt, framing, pack_tokens
from tiny_tokenizers import smollm2_like

WORDS = [f"w{i}" for i in range(40)]


def word_level(specials: dict[str, str], **kwargs) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(list(dict.fromkeys(specials.values())) + ["<unk>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **specials, **kwargs)


@pytest.fixture(scope="module")
def gpt_like() -> PreTrainedTokenizerFast:
    return word_level({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})


@pytest.fixture(scope="module")
def bert_like(tmp_path_factory) -> BertTokenizerFast:
    folder = tmp_path_factory.mktemp("bert")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder))


def make_documents(n: int = 30, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]
    docs[3] = " ".join(rng.choice(WORDS) for _ in range(200))  # longer than several windows
    docs[5] = ""  # empty documents are skipped
    return docs


def stream_of(tokenizer, docs: list[str], separator: int | None) -> list[int]:
    """The expected packed stream: each document's own tokens, separator-joined."""
    out: list[int] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if ids:
            out += ([separator] if out and separator is not None else []) + ids
    return out


def special_ids(tokenizer) -> torch.Tensor:
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.cls_token_id,
           tokenizer.sep_token_id}
    return torch.tensor(sorted(i for i in ids if i is not None))


def test_decoder_windows_exact_length_bos_first_and_masks(gpt_like):
    docs = make_documents()
    windows = list(pack_tokens(gpt_like, docs, 16))
    assert windows and all(isinstance(w, TokenWindow) for w in windows)
    for w in windows:
        assert w.input_ids.shape == w.train_mask.shape == (16,)
        assert w.input_ids.dtype == torch.long and w.train_mask.dtype == torch.bool
        assert w.input_ids[0].item() == gpt_like.bos_token_id
        assert torch.equal(w.train_mask, ~torch.isin(w.input_ids, special_ids(gpt_like)))
        assert w.attention_mask.all()


def test_content_reproduces_the_documents_in_order(gpt_like):
    docs = make_documents()
    windows = list(pack_tokens(gpt_like, docs, 16, batch_documents=7))
    packed = [t for w in windows for t in w.input_ids[1:].tolist()]
    expected = stream_of(gpt_like, docs, gpt_like.eos_token_id)
    assert len(windows) == len(expected) // 15  # the partial tail (< 15 tokens) is dropped
    assert packed == expected[:len(packed)]
    content = [t for w in windows for t, keep in zip(w.input_ids.tolist(), w.train_mask.tolist()) if keep]
    doc_tokens = [t for d in docs for t in gpt_like(d, add_special_tokens=False)["input_ids"]]
    assert content == doc_tokens[:len(content)]
    assert len(doc_tokens) - len(content) < 15


def test_deterministic_and_independent_of_batching(gpt_like):
    docs = make_documents(seed=4)
    runs = [list(pack_tokens(gpt_like, docs, 12, batch_documents=b)) for b in (1, 5, 64, 64)]
    for run in runs[1:]:
        assert len(run) == len(runs[0])
        assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.train_mask, b.train_mask)
                   for a, b in zip(run, runs[0]))


def test_keep_last_pads_and_masks_the_tail(gpt_like):
    docs = make_documents(seed=1)
    dropped = list(pack_tokens(gpt_like, docs, 16))
    kept = list(pack_tokens(gpt_like, docs, 16, keep_last=True))
    expected = stream_of(gpt_like, docs, gpt_like.eos_token_id)
    tail = len(expected) % 15
    assert tail and len(kept) == len(dropped) + 1
    last = kept[-1]
    assert last.input_ids.shape == (16,)
    assert last.attention_mask.tolist() == [True] * (1 + tail) + [False] * (15 - tail)
    assert (last.input_ids[1 + tail:] == gpt_like.pad_token_id).all()
    assert not last.train_mask[1 + tail:].any()
    assert [t for w in kept for t in w.input_ids[1:][w.attention_mask[1:]].tolist()] == expected


def test_bert_style_framing_cls_first_sep_last_and_between(bert_like):
    frame = framing(bert_like)
    assert (frame.first, frame.last, frame.separator) == (bert_like.cls_token_id, bert_like.sep_token_id,
                                                          bert_like.sep_token_id)
    docs = make_documents(seed=2)
    windows = list(pack_tokens(bert_like, docs, 10))
    assert windows
    for w in windows:
        assert w.input_ids.shape == (10,)
        assert w.input_ids[0].item() == bert_like.cls_token_id and w.input_ids[-1].item() == bert_like.sep_token_id
        assert torch.equal(w.train_mask, ~torch.isin(w.input_ids, special_ids(bert_like)))
    packed = [t for w in windows for t in w.input_ids[1:-1].tolist()]
    expected = stream_of(bert_like, docs, bert_like.sep_token_id)
    assert packed == expected[:len(packed)] and len(expected) - len(packed) < 8


def test_bert_style_keep_last_puts_sep_before_padding(bert_like):
    windows = list(pack_tokens(bert_like, ["w1 w2 w3"], 8, keep_last=True))
    assert len(windows) == 1
    w1, w2, w3 = bert_like.convert_tokens_to_ids(["w1", "w2", "w3"])
    cls, sep, pad = bert_like.cls_token_id, bert_like.sep_token_id, bert_like.pad_token_id
    assert windows[0].input_ids.tolist() == [cls, w1, w2, w3, sep, pad, pad, pad]
    assert windows[0].train_mask.tolist() == [False, True, True, True, False, False, False, False]
    assert windows[0].attention_mask.tolist() == [True] * 5 + [False] * 3


def test_add_bos_false_and_tokenizers_without_specials(gpt_like):
    docs = ["w1 w2 w3", "w4 w5", "w6"]
    eos = gpt_like.eos_token_id
    w1, w2, w3, w4, w5, w6 = gpt_like.convert_tokens_to_ids(["w1", "w2", "w3", "w4", "w5", "w6"])
    windows = list(pack_tokens(gpt_like, docs, 4, add_bos=False))
    assert [w.input_ids.tolist() for w in windows] == [[w1, w2, w3, eos], [w4, w5, eos, w6]]
    assert windows[0].train_mask.tolist() == [True, True, True, False]
    bare = word_level({"pad_token": "<pad>"})
    frame = framing(bare)
    assert (frame.first, frame.last, frame.separator) == (None, None, None)
    windows = list(pack_tokens(bare, docs, 3))
    assert [w.input_ids.tolist() for w in windows] == [bare.convert_tokens_to_ids(t.split())
                                                       for t in ("w1 w2 w3", "w4 w5 w6")]
    assert all(w.train_mask.all() for w in windows)


def test_literal_special_token_in_text_is_masked(gpt_like):
    window = next(pack_tokens(gpt_like, ["w1 <eos> w2"], 4))
    assert window.input_ids.tolist() == gpt_like.convert_tokens_to_ids(["<bos>", "w1", "<eos>", "w2"])
    assert window.train_mask.tolist() == [False, True, False, True]


def test_context_size_checks(gpt_like):
    with pytest.raises(ValueError, match="maximum positions"):
        pack_tokens(gpt_like, ["w1"], 32, max_positions=16)
    with pytest.raises(ValueError, match="context_size"):
        pack_tokens(gpt_like, ["w1"], 1)
    list(pack_tokens(gpt_like, ["w1"], 16, max_positions=16))  # equal is fine
    short = word_level({"bos_token": "<bos>", "eos_token": "<eos>"}, model_max_length=8)
    with pytest.warns(UserWarning, match="model_max_length"):
        list(pack_tokens(short, ["w1 w2"], 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(pack_tokens(short, ["w1 w2"], 12))  # warned once already
        list(pack_tokens(short, ["w1 w2"], 8))  # within the limit


def test_non_string_documents_are_rejected(gpt_like):
    with pytest.raises(TypeError, match="documents must be str"):
        list(pack_tokens(gpt_like, ["w1", 3], 4))


def test_batch_windows(gpt_like):
    windows = list(pack_tokens(gpt_like, make_documents(seed=3), 8, keep_last=True))
    n = len(windows)
    assert n % 4 != 0
    batches = list(batch_windows(windows, 4))
    assert [len(b) for b in batches] == [2] * len(batches)
    assert [b[0].shape for b in batches] == [(4, 8)] * (n // 4) + [(n % 4, 8)]
    assert torch.equal(torch.cat([b[0] for b in batches]), torch.stack([w.input_ids for w in windows]))
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.stack([w.train_mask for w in windows]))
    assert batches[0][1].dtype == torch.bool
    full = list(batch_windows(iter(windows), 4, drop_last=True, with_attention_mask=True))
    assert len(full) == n // 4 and all(len(b) == 3 and b[2].shape == (4, 8) for b in full)
    with pytest.raises(ValueError):
        list(batch_windows(windows, 0))


# -- real tokenizers' document framing ---------------------------------------------------------------
def test_smollm2_like_windows_start_with_the_document_token_not_the_chat_marker():
    tok = smollm2_like()
    assert tok("w1")["input_ids"] == tok.convert_tokens_to_ids(["w1"])  # it adds no BOS of its own
    frame = framing(tok)
    assert (frame.first, frame.last, frame.separator) == (0, None, 0)
    assert frame.special_ids == (0, 1, 2)
    windows = list(pack_tokens(tok, ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"], 5))
    w = dict(zip(WORDS, tok.convert_tokens_to_ids(WORDS)))
    assert [x.input_ids.tolist() for x in windows] == [[0, w["w1"], w["w2"], w["w3"], 0],
                                                       [0, w["w4"], w["w5"], 0, w["w6"]]]
    assert windows[1].train_mask.tolist() == [False, True, True, False, True]
    assert encode_prompt(tok, "w1 w2") == [0, w["w1"], w["w2"]]
    assert framing(tok, add_bos=False).first is None and framing(tok, add_bos=False).separator == 0


def test_no_bos_tokenizers_use_their_document_token_or_eos():
    eos_only = word_level({"eos_token": "<eos>"})
    frame = framing(eos_only)
    assert frame.first == frame.separator == eos_only.eos_token_id
    gpt2_like = word_level({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    assert framing(gpt2_like).first == framing(gpt2_like).separator == gpt2_like.eos_token_id


def test_bos_tokenizers_keep_bos_framing(tmp_path, gpt_like):
    from jumpscope.models.llama2c import Llama2cTokenizer
    from llama2c_files import write_tokenizer

    write_tokenizer(tmp_path / "tok.bin")
    llama = Llama2cTokenizer(str(tmp_path / "tok.bin"))
    frame = framing(llama)
    assert (frame.first, frame.separator) == (llama.bos_token_id, llama.eos_token_id) == (1, 2)
    assert encode_prompt(llama, "hello") == llama.encode("hello")  # <s> first, as the tokenizer adds it
    assert next(pack_tokens(llama, ["hello world"] * 4, 6)).input_ids[0].item() == 1
    # a declared BOS the tokenizer does not add, with no <|endoftext|>: still BOS first
    assert (framing(gpt_like).first, framing(gpt_like).separator) == (gpt_like.bos_token_id, gpt_like.eos_token_id)
