"""`jumpscope find` end to end on a tiny causal LM: the planted latent comes first in the JSON, the
table and --out; careless inputs are one-line errors with exit status 2."""

import json
import re

import pytest

import jumpscope
from jumpscope.cli import main
from jumpscope.errors import ConfigError
from jumpscope.jobs.find import FindJobConfig, read_texts, run_find
from jumpscope.models.loading import load_model
from jumpscope.sae import build
from planted_concepts import texts, token_detector
from tiny_causal_lm import write_tiny_causal_lm

PLANTED, D_SAE = 3, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama2.c model and an SAE at ``embed`` whose latent PLANTED fires on the token
    ' hello' only (its embedding direction, thresholded between it and every other token); the
    other latents are random directions orthogonal to it."""
    root = tmp_path_factory.mktemp("find")
    model_path = write_tiny_causal_lm(root / "model")
    loaded = load_model(str(model_path))
    hello = loaded.tokenizer.convert_tokens_to_ids("\u2581hello")
    sae = token_detector(loaded, [hello], slots=(PLANTED,), d_sae=D_SAE)
    jumpscope.save(sae, root / "sae", format="native")
    (root / "pos.txt").write_text("\n".join(texts(10, True, seed=1, max_words=12)) + "\n\n")  # a blank line is skipped
    (root / "neg.txt").write_text("\n".join(texts(10, False, seed=2, max_words=12)))
    return root, model_path


def find(root, model_path, *args):
    return main(["find", str(root / "sae"), "--model", str(model_path), "--device", "cpu", *args])


def test_json_puts_the_planted_latent_first(setup, capsys):
    root, model_path = setup
    out = root / "result.json"
    assert find(root, model_path, "--positive", str(root / "pos.txt"), "--negative", str(root / "neg.txt"),
                "--json", "--out", str(out), "--top", "5") == 0
    data = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == data
    first = data["latents"][0]
    assert (first["latent"], first["auroc"], first["mean_negative"]) == (PLANTED, 1.0, 0.0)
    assert all(m["auroc"] < 1.0 for m in data["latents"][1:]) and len(data["latents"]) == 5
    assert first["examples"][0]["token"] == "hello" and "[[hello]]" in first["examples"][0]["snippet"]
    assert (data["n_positive"], data["n_negative"], data["site"], data["sort"]) == (10, 10, "embed", "auroc")
    assert data["model"] == str(model_path.resolve()) and data["job"]["top"] == 5


def test_table_and_inline_texts(setup, capsys):
    root, model_path = setup
    assert find(root, model_path, "--positive", str(root / "pos.txt"), "--positive", "abc hello bc",
                "--negative", str(root / "neg.txt"), "--negative", "cab ace", "--top", "3") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("11 positive vs 11 negative texts at embed")
    assert table[1].split()[:6] == ["rank", "latent", "AUROC", "mean+", "mean-", "diff"]
    assert table[2].split()[:3] == ["1", str(PLANTED), "1.000"] and "'hello'" in table[2]
    assert len(table) == 5


def test_the_model_defaults_to_the_one_the_sae_records(setup):
    root, _ = setup
    result = run_find(FindJobConfig(sae=str(root / "sae"), positive=(str(root / "pos.txt"),),
                                    negative=(str(root / "neg.txt"),), top=2, device="cpu"))
    assert result.latents[0].latent == PLANTED and result.latents[0].auroc == 1.0


def test_read_texts(tmp_path):
    (tmp_path / "a.txt").write_text(" one line \n\n two lines\n")
    assert read_texts((str(tmp_path / "a.txt"), "an inline text", "word"), "positive") == \
        ["one line", "two lines", "an inline text", "word"]
    with pytest.raises(FileNotFoundError, match="positive file .*missing.txt does not exist"):
        read_texts((str(tmp_path / "missing.txt"), "x y"), "positive")
    long = " ".join(["word"] * 2000)  # far beyond a file name's length: still an inline text
    assert read_texts((long, "x\0y z"), "positive") == [long, "x\0y z"]
    with pytest.raises(ConfigError, match="at least 2 negative texts to rank latents, got 1"):
        read_texts(("just one",), "negative")


def error_of(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jumpscope: error: "), err
    return err


@pytest.mark.parametrize("case, message", [
    ("empty", "positive file .*empty.txt has no examples"),
    ("missing", "positive file .*nothere.txt does not exist"),
    ("one each", "need at least 2 positive texts to rank latents, got 1"),
    ("folder", "is not a regular file"),
    ("top", "top must be positive, got 0"),
])
def test_careless_inputs_exit_2_with_one_line(setup, tmp_path, capsys, case, message):
    root, model_path = setup
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "one.txt").write_text("hello abc\n")
    positive = {"empty": tmp_path / "empty.txt", "missing": tmp_path / "nothere.txt", "one each": tmp_path / "one.txt",
                "folder": tmp_path, "top": root / "pos.txt"}[case]
    negative = tmp_path / "one.txt" if case == "one each" else root / "neg.txt"
    extra = ["--top", "0"] if case == "top" else []
    assert find(root, model_path, "--positive", str(positive), "--negative", str(negative), *extra) == 2
    assert re.search(message, error_of(capsys))


def test_an_sae_at_a_site_the_model_lacks(setup, tmp_path, capsys):
    root, model_path = setup
    sae = build("relu", d_in=32, d_sae=4, site="layers.9.resid_post", model=str(model_path))
    jumpscope.save(sae, tmp_path / "far", format="native")
    assert main(["find", str(tmp_path / "far"), "--positive", str(root / "pos.txt"), "--negative",
                 str(root / "neg.txt"), "--device", "cpu"]) == 2
    assert "layers.9.resid_post: layer 9 out of range" in error_of(capsys)
    assert main(["find", str(tmp_path / "nowhere"), "--positive", "a b", "--positive", "c d", "--negative", "e f",
                 "--negative", "g h"]) == 2
    assert "no SAE at" in error_of(capsys)
