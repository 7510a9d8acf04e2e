"""`jumpscope refit` end to end on a tiny causal LM: refit decoders, native folders, both versions evaluated."""

import importlib
import json

import pytest
import torch

import jumpscope
from jumpscope.activations import ActivationConfig
from jumpscope.cli import main
from jumpscope.jobs.refit import RefitJobConfig, affordable_rows
from jumpscope.jobs.train import TrainJobConfig, run_train
from jumpscope.train import TrainerConfig
from tiny_causal_lm import write_corpus, write_tiny_causal_lm

FAST = TrainerConfig(batch_size=256, progress=False, init_sample_tokens=512, log_every=100, checkpoint_every=100)
SITE = "layers.1.resid_post"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("refit")
    model = write_tiny_causal_lm(root / "model")
    corpus = write_corpus(root / "corpus.txt")
    job = TrainJobConfig(site=(SITE,), width=64, target_l0=4, tokens=256 * 8, out=str(root / "run"), device="cpu",
                         eval_tokens=512, trainer=FAST)
    activations = ActivationConfig(model=str(model), corpus=str(corpus), txt_split="paragraph", context_size=32,
                                   model_batch_size=4, shuffle_buffer_tokens=1024)
    run_train(job, activations)
    return root, activations


def refit_cli(activations, *args):
    return main(["refit", *args, "--corpus", activations.corpus, "--txt-split", "paragraph", "--context-size", "32",
                 "--model-batch-size", "4", "--shuffle-buffer-tokens", "1024", "--eval-tokens", "512",
                 "--no-progress"])


def test_refit_writes_a_native_sae_with_a_better_fit_and_evaluates_both(trained, capsys):
    root, activations = trained
    out = root / "refit"
    assert refit_cli(activations, str(root / "run" / SITE), "--tokens", "2048", "--out", str(out)) == 0
    given, refit = jumpscope.load(root / "run" / SITE), jumpscope.load(out / SITE)
    report = json.loads((out / "refit.json").read_text())
    note = report["refit"][SITE]
    assert note["refit_rows"] == 2048 and note["refit_fvu_after"] < note["refit_fvu_before"]
    assert not torch.allclose(refit.W_dec, given.W_dec)
    assert torch.allclose(refit.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)  # JumpReLU's rows made unit again
    results = report["results"]
    before, after = results[f"{SITE} (as given)"], results[f"{SITE} (refit)"]
    assert after["l0"] == pytest.approx(before["l0"], rel=1e-3)  # the codes did not move
    assert "delta_lm_loss" in after and "delta_lm_loss" in before  # the model's own measure, both versions
    assert "(refit)" in (out / "refit.md").read_text()
    assert "FVU on 2,048 training rows" in capsys.readouterr().out


def test_refit_never_overwrites_an_earlier_refit(trained, capsys):
    root, activations = trained
    out = root / "refit_twice"
    (out / SITE).mkdir(parents=True)
    assert refit_cli(activations, str(root / "run" / SITE), "--out", str(out), "--tokens", "512") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("jumpscope: error:") and "exists: choose another --out" in error and "\n" not in error


def test_rows_beyond_half_the_free_memory_are_not_taken(monkeypatch, caplog):
    module = importlib.import_module("jumpscope.train.refit_rows")  # where the refit rows' memory is read
    monkeypatch.setattr(module, "available_memory", lambda device: 2 * 10_000 * 4 * 64)
    assert affordable_rows(5_000, {"a": 64}) == 5_000
    assert affordable_rows(50_000, {"a": 64}) == 10_000 and "refitting on 10000" in caplog.text
    monkeypatch.setattr(module, "available_memory", lambda device: 100)
    with pytest.raises(ValueError, match="too little for a refit"):
        affordable_rows(50_000, {"a": 64})


@pytest.mark.parametrize("field, value", [("tokens", 0), ("ridge", 0.0), ("ridge", float("nan")), ("eval_tokens", -1)])
def test_bad_settings_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        RefitJobConfig(saes=("x",), **{field: value})


def test_a_transcoder_is_refit_toward_its_target_site_and_a_jacobian_pair_is_skipped(trained, caplog):
    from jumpscope.jobs.refit import run_refit

    root, activations = trained
    transcoder = jumpscope.build("topk", d_in=32, d_sae=48, k=4, d_out=32, apply_b_dec_to_input=False, seed=1,
                                 site="layers.1.mlp_in", target_site="layers.1.mlp_out", model=activations.model)
    jumpscope.save(transcoder, root / "transcoder")
    pair = jumpscope.build("jsae", d_in=32, d_sae=48, k=4, seed=1, site="layers.1.mlp_in", model=activations.model)
    jumpscope.save(pair, root / "pair")
    job = RefitJobConfig(saes=(str(root / "transcoder"), str(root / "pair")), tokens=1024, out=str(root / "refit_tc"),
                         compare=False, device="cpu", progress=False)
    notes = run_refit(job, activations)["refit"]
    assert list(notes) == ["transcoder"] and notes["transcoder"]["refit_fvu_after"] < notes["transcoder"]["refit_fvu_before"]
    assert "pair: JacobianSAE SAEs keep their decoder" in caplog.text and not (root / "refit_tc" / "pair").exists()
    refit = jumpscope.load(root / "refit_tc" / "transcoder")
    assert refit.cfg.target_site == "layers.1.mlp_out" and torch.equal(refit.W_enc, transcoder.W_enc)
