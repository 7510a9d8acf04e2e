"""`jumpscope eval` end to end on a tiny causal LM (llama2.c format, with its tokenizer) and on MiniLM."""

import json
import logging

import pytest
import torch

import jumpscope
from jumpscope.cli import main
from lm_losses import next_token_losses
from jumpscope.evaluate.report import dense_table, points_table
from jumpscope.activations import ActivationConfig, ActivationSource
from jumpscope.evaluate.heldout import evaluation_windows, results_table
from jumpscope.sae.metrics import MIN_DEAD_SAMPLE_TOKENS, dead_sample_warning
from jumpscope.models.splice import splice
from jumpscope.jobs.train import TrainJobConfig, run_train
from jumpscope.train import TrainerConfig
from tiny_causal_lm import write_corpus, write_tiny_causal_lm

FAST = TrainerConfig(batch_size=256, progress=False, init_sample_tokens=512, log_every=100, checkpoint_every=100)
SITES = ("layers.1.resid_post", "layers.2.mlp_out")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = write_tiny_causal_lm(root / "model")
    corpus = write_corpus(root / "corpus.txt")
    job = TrainJobConfig(site=SITES, width=64, target_l0=4, tokens=256 * 8, out=str(root / "run"), device="cpu",
                         eval_tokens=512, trainer=FAST)
    activations = ActivationConfig(model=str(model), corpus=str(corpus), txt_split="paragraph", context_size=32,
                                   model_batch_size=4, shuffle_buffer_tokens=1024)
    run_train(job, activations)
    return root, activations


def eval_cli(root, activations, *args):
    return main(["eval", *args, "--corpus", activations.corpus, "--txt-split", "paragraph", "--context-size", "32",
                 "--model-batch-size", "4", "--eval-tokens", "512"])


def test_eval_reproduces_the_training_summary_on_the_same_held_out_text(trained):
    root, activations = trained
    out = root / "eval.json"
    assert eval_cli(root, activations, *(str(root / "run" / s) for s in SITES), "--out", str(out)) == 0
    results = json.loads(out.read_text())["results"]
    summary = json.loads((root / "run" / "summary.json").read_text())["held_out"]
    for site in SITES:
        row, reference = results[site], summary[site]
        for key in ("l0", "fvu", "dead_fraction", "ce_clean", "delta_lm_loss", "kl_div", "ce_loss_recovered"):
            assert row[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-7), (site, key)
        assert row["kl_div"] >= 0
        assert row["ce_loss_recovered"] == pytest.approx(
            (row["ce_zero_ablated"] - row["ce_spliced"]) / (row["ce_zero_ablated"] - row["ce_clean"]))
        assert row["architecture"] == "jumprelu" and row["n_tokens"] > 0
    assert "CE rec. (zero)" in (root / "eval.md").read_text()


def test_eval_together_splices_every_site_at_once(trained, capsys):
    root, activations = trained
    out = root / "together.json"
    assert eval_cli(root, activations, *(str(root / "run" / s) for s in SITES), "--together", "--out", str(out)) == 0
    results = json.loads(out.read_text())["results"]
    assert "| all together |" in capsys.readouterr().out
    # the same measure computed directly: CE with both SAEs spliced in, at ordinary positions
    source = ActivationSource(activations, SITES)
    saes = {site: jumpscope.load(root / "run" / site) for site in SITES}
    clean = spliced = count = 0.0
    for ids, train in evaluation_windows(source, 512):
        attention = torch.ones_like(train)
        clean += next_token_losses(source.loaded.model, ids, train, attention).sum().item()
        with splice(source.loaded.model, saes, positions=train):
            losses = next_token_losses(source.loaded.model, ids, train, attention)
        spliced, count = spliced + losses.sum().item(), count + losses.numel()
    assert results["all together"]["delta_lm_loss"] == pytest.approx((spliced - clean) / count, rel=1e-4)
    assert all(results["all together"]["delta_lm_loss"] != pytest.approx(results[s]["delta_lm_loss"]) for s in SITES)


def test_eval_bad_inputs_are_clear_errors(trained, tmp_path, capsys):
    root, activations = trained
    sae = str(root / "run" / SITES[0])
    cases = [
        ([sae, "--site", "layers.7.resid_post"], "layer 7 out of range"),
        ([sae, "--site", "module:model.layers.1.mlp.up_proj"], "d_in=32 does not fit site 'module:model.layers.1.mlp.up_proj' of this model (width 48)"),
        ([sae, "--ablations", "half"], "unknown ablations ['half']"),
        ([sae, sae, "--together"], "needs SAEs at different sites"),
        ([str(tmp_path / "missing")], "missing"),
    ]
    for argv, message in cases:
        assert eval_cli(root, activations, *argv, "--out", str(tmp_path / "x.json")) == 2, argv
        assert message in capsys.readouterr().err, argv
    foreign = jumpscope.build("jumprelu", d_in=32, d_sae=16)  # no site, no model recorded
    foreign.save(tmp_path / "foreign")
    assert eval_cli(root, activations, str(tmp_path / "foreign"), "--out", str(tmp_path / "x.json")) == 2
    assert "records no hook site" in capsys.readouterr().err
    assert eval_cli(root, activations, str(tmp_path / "foreign"), "--site", SITES[0],
                    "--out", str(tmp_path / "x.json")) == 2
    assert "give --model" in capsys.readouterr().err


@pytest.mark.parametrize("arch,sparsity", [("topk", ["--k", "4"]), ("jumprelu", ["--target-l0", "4"])])
def test_train_and_eval_a_transcoder_with_a_skip_connection(trained, tmp_path, arch, sparsity):
    root, activations = trained
    out = tmp_path / "tc"
    argv = ["train", "--transcoder", "--skip-connection", "--arch", arch, *sparsity, "--site", "layers.1.mlp_in",
            "--width", "48", "--tokens", str(256 * 6), "--batch-size", "256", "--init-sample-tokens", "512",
            "--no-progress", "--out", str(out), "--model", activations.model, "--device", "cpu"]
    common = ["--corpus", activations.corpus, "--txt-split", "paragraph", "--context-size", "32",
              "--model-batch-size", "4", "--eval-tokens", "512"]
    assert main(argv + common) == 0
    name = "layers.1.mlp_in-transcoder"
    sae = jumpscope.load(out / name)
    assert (sae.cfg.site, sae.cfg.target_site, sae.cfg.skip_connection) == ("layers.1.mlp_in", "layers.1.mlp_out", True)
    assert sae.W_skip.abs().sum() > 0  # the skip was trained
    summary = json.loads((out / "summary.json").read_text())["held_out"][name]
    assert summary["site"] == "layers.1.mlp_in -> layers.1.mlp_out" and 0 < summary["fvu"] < 2
    assert main(["eval", str(out / name), "--out", str(tmp_path / "e.json"), *common]) == 0
    again = json.loads((tmp_path / "e.json").read_text())["results"][name]
    for key in ("l0", "fvu", "delta_lm_loss", "kl_div"):
        assert again[key] == pytest.approx(summary[key], rel=1e-5, abs=1e-7), key


def test_transcoder_sites_must_be_mlp_inputs(trained, tmp_path, capsys):
    root, activations = trained
    assert main(["train", "--transcoder", "--site", "layers.1.resid_post", "--out", str(tmp_path / "x"),
                 "--model", activations.model, "--corpus", activations.corpus]) == 2
    assert "a transcoder reads an MLP's input: give --site layers.L.mlp_in" in capsys.readouterr().err


def test_dead_fraction_names_its_sample_size_and_warns_when_small(trained, tmp_path, caplog):
    root, activations = trained
    out = tmp_path / "e.json"
    with caplog.at_level(logging.WARNING):
        assert eval_cli(root, activations, str(root / "run" / SITES[0]), "--out", str(out)) == 0
    n = json.loads(out.read_text())["results"][SITES[0]]["n_tokens"]
    assert n < MIN_DEAD_SAMPLE_TOKENS and f"| dead on {n:,} tokens |" in out.with_suffix(".md").read_text()
    warnings = [r.getMessage() for r in caplog.records if "dead fraction" in r.getMessage()]
    assert len(warnings) == 1 and f"only {n:,} tokens" in warnings[0] and "\n" not in warnings[0]
    assert "| dead on " in (root / "run" / "summary.md").read_text()  # the training summary too


def test_dead_sample_threshold_and_mixed_sample_sizes():
    assert dead_sample_warning(MIN_DEAD_SAMPLE_TOKENS) is None and dead_sample_warning(MIN_DEAD_SAMPLE_TOKENS - 1)
    row = {"site": "s", "d_sae": 8, "l0": 1.0, "fvu": 0.5, "dead_fraction": 0.25, "dense_fraction": 0.0}
    table = results_table({"a": {**row, "n_tokens": 2040}, "b": {**row, "n_tokens": 12240}}, "causal_lm")
    assert "| dead |" in table and "0.2500 (dead on 2,040 tokens)" in table and "(dead on 12,240 tokens)" in table
    points = [{"name": f"topk-k_{k}", "arch": "topk", "knob": "k", "value": k, "site": "s",
               "held_out": {**row, "n_tokens": 12240, "l0": float(k), "delta_lm_loss": 0.1}} for k in (4, 8)]
    assert "| dead on 12,240 tokens |" in points_table(points, "causal_lm")
    assert "mean dead on 12,240 tokens |" in dense_table(points)


def test_a_second_eval_on_the_same_text_reuses_the_clean_and_ablation_passes(trained, tmp_path, monkeypatch):
    from jumpscope.evaluate.passcache import PassCache

    root, activations = trained
    saes = [str(root / "run" / s) for s in SITES]
    assert len(list((root / "run" / "eval_cache").glob("*.safetensors"))) == 5  # training kept its own
    assert eval_cli(root, activations, *saes, "--out", str(tmp_path / "a.json")) == 0
    cached = sorted(p.name for p in (tmp_path / "eval_cache").iterdir())
    assert len(cached) == 1 + 2 * len(SITES)  # one clean pass, two ablations per site

    def refuse(*args):
        raise AssertionError("recomputed a cached pass")

    monkeypatch.setattr(PassCache, "save_clean", refuse)
    monkeypatch.setattr(PassCache, "save_total", refuse)
    assert eval_cli(root, activations, *saes, "--ablations", "zero,mean", "--out", str(tmp_path / "b.json")) == 0
    first, again = (json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in "ab")
    assert again == first and sorted(p.name for p in (tmp_path / "eval_cache").iterdir()) == cached


def test_eval_without_ablations_says_ce_recovered_was_not_computed(trained, tmp_path):
    root, activations = trained
    out = tmp_path / "none.json"
    assert eval_cli(root, activations, str(root / "run" / SITES[0]), "--ablations", "none", "--no-eval-cache",
                    "--out", str(out)) == 0
    row = json.loads(out.read_text())["results"][SITES[0]]
    assert "ce_loss_recovered" not in row and row["kl_div"] >= 0
    assert "not computed" in out.with_suffix(".md").read_text() and not (tmp_path / "eval_cache").exists()
