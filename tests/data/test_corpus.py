"""Text corpora: local files, folders and globs in a fixed order, clear errors, optional
dependencies (pyarrow, datasets) reported by name, and the deterministic builtin corpus."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from jumpscope.data import builtin_corpus as corpus_module
from jumpscope.data.corpus import CorpusError, builtin_entries, open_corpus


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- encodings -------------------------------------------------------------------------------------
def test_non_utf8_text_names_the_file_the_byte_and_its_offset(tmp_path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\u00e9 au lait\n\nand more".encode("latin-1"))
    with pytest.raises(CorpusError) as error:
        list(open_corpus(str(bad)))
    message = str(error.value)
    assert str(bad) in message and "byte 0xe9 at offset 3" in message and "--encoding" in message
    assert "\n" not in message
    assert list(open_corpus(str(bad), encoding="latin-1")) == ["caf\u00e9 au lait\n\nand more"]
    assert list(open_corpus(str(bad), encoding_errors="replace")) == ["caf\ufffd au lait\n\nand more"]


def test_decode_error_offsets_are_file_offsets(tmp_path):
    # a two-byte character straddles the 1 MiB block boundary of the offset search; the bad byte follows
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * (2**20 - 1) + "\u00e9".encode() + b"xy\xff tail")
    with pytest.raises(CorpusError, match=f"byte 0xff at offset {2**20 + 3:,}"):
        list(open_corpus(str(big)))
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"text": "fine"}\n{"text": "na\xefve"}\n')
    assert rows.read_bytes().index(b"\xef") == 17 + 12  # the second line's 13th byte
    with pytest.raises(CorpusError, match=r"rows\.jsonl: not valid utf-8 text \(byte 0xef at offset 29\)"):
        list(open_corpus(str(rows)))
    assert list(open_corpus(str(rows), encoding="cp1252")) == ["fine", "na\u00efve"]


def test_unknown_encoding_options_are_refused(tmp_path):
    path = write(tmp_path / "a.txt", "text")
    with pytest.raises(CorpusError, match="unknown encoding 'klingon'"):
        open_corpus(str(path), encoding="klingon")
    with pytest.raises(CorpusError, match="encoding_errors must be 'strict' or 'replace'"):
        open_corpus(str(path), encoding_errors="ignore")


def test_cli_names_the_undecodable_file_and_reads_it_with_encoding(tmp_path, capsys):
    from jumpscope.cli import main
    from tiny_causal_lm import WORDS, write_tiny_causal_lm

    model = write_tiny_causal_lm(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes("\n\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) + " caf\u00e9"
                                    for i in range(40)).encode("latin-1"))
    offset = corpus.read_bytes().index(b"\xe9")
    argv = ["train", "--model", str(model), "--corpus", str(corpus), "--txt-split", "paragraph", "--context-size", "32",
            "--model-batch-size", "4", "--site", "layers.1.resid_post", "--width", "32", "--target-l0", "4",
            "--tokens", "512", "--batch-size", "256", "--init-sample-tokens", "256", "--shuffle-buffer-tokens", "512",
            "--eval-tokens", "128", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"jumpscope: error: {corpus}: not valid utf-8 text "
                                                         f"(byte 0xe9 at offset {offset:,})"), err
    assert "--encoding" in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--encoding", "latin-1"]) == 0
    assert main([*argv, "--out", str(tmp_path / "c"), "--encoding-errors", "replace"]) == 0


# -- local files -------------------------------------------------------------------------------

def test_txt_one_document_per_file_by_default(tmp_path):
    f = write(tmp_path / "a.txt", "first paragraph\nstill first\n\nsecond paragraph\n")
    corpus = open_corpus(str(f))
    assert list(corpus) == ["first paragraph\nstill first\n\nsecond paragraph\n"]
    assert list(corpus) == list(corpus)  # re-iterable
    assert corpus.name == f"files:{f.resolve()}"


def test_txt_split_on_paragraphs_and_lines(tmp_path):
    f = write(tmp_path / "a.txt", "one\ntwo\n  \nthree\n\n\n\nfour\n")
    assert list(open_corpus(str(f), txt_split="paragraph")) == ["one\ntwo", "three", "four"]
    assert list(open_corpus(str(f), txt_split="line")) == ["one", "two", "three", "four"]
    with pytest.raises(CorpusError, match="txt_split"):
        open_corpus(str(f), txt_split="sentence")
    with pytest.raises(TypeError, match="unknown corpus option.*'txt_splt'"):
        open_corpus(str(f), txt_splt="line")


def test_jsonl_default_and_custom_field(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "alpha", "body": "x"}\n\n{"text": "beta", "body": "y"}\n')
    assert list(open_corpus(str(f))) == ["alpha", "beta"]
    assert list(open_corpus(str(f), text_field="body")) == ["x", "y"]


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    f = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": "ok too"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:3: invalid JSON"):
        list(open_corpus(str(f)))


def test_jsonl_missing_or_non_string_field(tmp_path):
    f = write(tmp_path / "m.jsonl", '{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(CorpusError, match=r"m\.jsonl:2: no field 'text'.*content"):
        list(open_corpus(str(f)))
    g = write(tmp_path / "n.jsonl", '{"text": 5}\n')
    with pytest.raises(CorpusError, match=r"n\.jsonl:1: field 'text' is a int"):
        list(open_corpus(str(g)))


def make_tree(root):
    write(root / "b.txt", "B")
    write(root / "a.jsonl", json.dumps({"text": "A1"}) + "\n" + json.dumps({"text": "A2"}) + "\n")
    write(root / "sub" / "c.txt", "C")
    write(root / "sub" / "deeper" / "d.jsonl", json.dumps({"text": "D"}) + "\n")
    write(root / "aa" / "e.txt", "E")
    write(root / ".hidden" / "h.txt", "hidden")
    write(root / ".h.txt", "hidden")
    write(root / "notes.md", "ignored")


def test_folder_is_recursive_sorted_and_skips_hidden_and_other_types(tmp_path):
    make_tree(tmp_path / "data")
    corpus = open_corpus(str(tmp_path / "data"))
    # sorted by path relative to the folder: a.jsonl, aa/e.txt, b.txt, sub/c.txt, sub/deeper/d.jsonl
    assert list(corpus) == ["A1", "A2", "E", "B", "C", "D"]
    assert list(corpus) == list(open_corpus(str(tmp_path / "data")))


def test_glob_patterns(tmp_path):
    make_tree(tmp_path / "data")
    assert list(open_corpus(str(tmp_path / "data" / "**" / "*.txt"))) == ["E", "B", "C"]
    assert list(open_corpus(str(tmp_path / "data" / "*.jsonl"))) == ["A1", "A2"]
    assert list(open_corpus(str(tmp_path / "data" / "su?"))) == ["C", "D"]  # a matched folder is expanded
    with pytest.raises(CorpusError, match="matches no"):
        open_corpus(str(tmp_path / "data" / "*.csv"))


def test_comma_separated_specs_mix_documents_in_turn(tmp_path):
    books = write(tmp_path / "books.txt", "b1\nb2\nb3\n")
    wiki = write(tmp_path / "wiki.txt", "w1\n")
    mixed = open_corpus(f"{books}, {wiki}", txt_split="line")
    assert list(mixed) == ["b1", "w1", "b2", "b3"]  # one from each in turn; the shorter one drops out
    assert mixed.name == f"files:{books},files:{wiki}"
    with pytest.raises(CorpusError, match="nope"):
        open_corpus(f"{books},{tmp_path / 'nope.txt'}")


def test_empty_folder_and_unsupported_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        open_corpus(str(tmp_path / "empty"))
    with pytest.raises(CorpusError, match="unsupported file type '.csv'"):
        open_corpus(str(write(tmp_path / "x.csv", "a,b")))


@pytest.mark.parametrize("spec", ["no/such/file.txt", "wikipedia", "hf", "s3://bucket/x"])
def test_unknown_spec_lists_accepted_forms(spec):
    with pytest.raises(CorpusError) as info:
        open_corpus(spec)
    message = str(info.value)
    assert repr(spec) in message
    for form in ("'builtin'", ".jsonl", "glob", "hf:NAME[:CONFIG][:SPLIT]", "save_to_disk"):
        assert form in message


def test_empty_spec():
    with pytest.raises(CorpusError, match="accepted corpus specs"):
        open_corpus("")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_says_how_to_install(tmp_path):
    f = write(tmp_path / "d.parquet", "not really parquet")
    with pytest.raises(CorpusError, match="pip install pyarrow"):
        open_corpus(str(f))  # at open time, not on first read
    with pytest.raises(CorpusError, match="pip install pyarrow"):
        open_corpus(str(tmp_path))  # a folder holding parquet files too


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_parquet_reads_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["p1", "p2", ""], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert list(open_corpus(str(tmp_path / "d.parquet"))) == ["p1", "p2"]


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
@pytest.mark.parametrize("spec", ["hf:wikitext", "hf:wikitext:wikitext-2-raw-v1:train"])
def test_hf_without_datasets_names_the_package(spec):
    with pytest.raises(CorpusError, match=r"'datasets' package.*pip install datasets"):
        open_corpus(spec)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_saved_dataset_folder_without_datasets_names_the_package(tmp_path):
    write(tmp_path / "ds" / "dataset_info.json", "{}")
    write(tmp_path / "ds" / "state.json", "{}")
    with pytest.raises(CorpusError, match="pip install datasets"):
        open_corpus(str(tmp_path / "ds"))


# -- builtin -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin():
    return builtin_entries(cache_dir=False)


def test_builtin_is_deterministic(builtin):
    again = builtin_entries(cache_dir=False, refresh=True)  # a second, independent extraction
    assert again == builtin


def test_builtin_size_order_and_content(builtin):
    n_chars = sum(len(text) for _, text in builtin)
    # Measured 1.96M characters (7.6k documents) on CPython 3.11.7/Linux. The reference-manual
    # topics alone are ~0.46M and the module/class/function docstrings ~1.5M; 1M leaves room for
    # other versions and platforms while still catching an extraction that lost most modules.
    assert n_chars > 1_000_000
    names = [name for name, _ in builtin]
    docs = [name for name in names if not name.startswith("topic:")]
    topics = [name for name in names if name.startswith("topic:")]
    assert docs == sorted(docs) and topics == sorted(topics) and names == docs + topics
    assert len(set(text for _, text in builtin)) == len(builtin)  # deduplicated
    entries = dict(builtin)
    assert entries["json.dumps"].startswith("Serialize")
    assert entries["json"].startswith("JSON (JavaScript Object Notation)")
    assert "topic:assert" in entries and "assert" in entries["topic:assert"]
    assert any(name.startswith("builtins.") for name in names)  # C modules too, not only .py sources
    tops = {name.split(".")[0] for name in docs}
    assert not tops & {"tkinter", "turtle", "idlelib", "antigravity", "this", "test"}
    assert not any(part.startswith("_") for name in docs for part in name.split(".")[:1])


def test_builtin_corpus_and_disk_cache(builtin, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "_MEMORY", {})
    corpus = open_corpus("builtin", cache_dir=tmp_path)
    assert corpus.name == "builtin:python-" + ".".join(map(str, sys.version_info[:3]))
    assert list(corpus) == [text for _, text in builtin]
    files = list(tmp_path.glob("builtin-corpus-*.json"))
    assert len(files) == 1 and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(corpus_module, "_MEMORY", {})
    monkeypatch.setattr(corpus_module, "_extract_isolated", lambda: pytest.fail("should read the disk cache"))
    assert builtin_entries(cache_dir=tmp_path) == builtin
    files[0].write_text("{not json", encoding="utf-8")  # a corrupt cache is ignored and rewritten
    monkeypatch.setattr(corpus_module, "_MEMORY", {})
    monkeypatch.setattr(corpus_module, "_extract_isolated", lambda: builtin)
    assert builtin_entries(cache_dir=tmp_path) == builtin
    assert json.loads(files[0].read_text(encoding="utf-8"))["entries"] == [list(e) for e in builtin]
