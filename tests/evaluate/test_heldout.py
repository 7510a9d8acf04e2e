"""Held-out evaluation: the token budget it honours, the ablations it skips, the cache it keeps."""

import dataclasses
import logging

import pytest

import jumpscope
from jumpscope.activations import ActivationConfig, ActivationSource
from jumpscope.evaluate.heldout import evaluate_saes, evaluation_windows, results_table
from tiny_causal_lm import write_corpus, write_tiny_causal_lm

SITE = "layers.1.resid_post"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    cfg = ActivationConfig(model=str(write_tiny_causal_lm(root / "model")), corpus=str(write_corpus(root / "c.txt")),
                           txt_split="paragraph", context_size=32, model_batch_size=4)
    return ActivationSource(cfg, [SITE])


@pytest.mark.parametrize("eval_tokens,sizes,note", [(128, [4], None), (64, [2], None), (160, [4, 1], None),
                                                    (40, [2], "whole context windows"),
                                                    (1, [1], "whole context windows")])
def test_eval_tokens_are_honoured_to_the_window(source, caplog, eval_tokens, sizes, note):
    with caplog.at_level(logging.WARNING):
        batches = evaluation_windows(source, eval_tokens)
    assert [len(ids) for ids, _ in batches] == sizes and all(ids.shape[1] == 32 for ids, _ in batches)
    lines = [r.getMessage() for r in caplog.records if "held-out tokens" in r.getMessage()]
    if note is None:
        assert not lines
    else:
        assert len(lines) == 1 and note in lines[0] and f"{sum(sizes) * 32:,} held-out tokens" in lines[0]
    # the windows are the first held-out ones, in order, however they are cut
    whole = [ids for ids, _ in evaluation_windows(source, 32 * 5)]
    flat = [row for ids in whole for row in ids]
    assert all((row == flat[i]).all() for i, row in enumerate(r for ids, _ in batches for r in ids))


def test_a_small_corpus_says_it_ran_out(source, caplog):
    with caplog.at_level(logging.WARNING):
        batches = evaluation_windows(source, 10**9)
    assert any("no more held-out text" in r.getMessage() for r in caplog.records)
    assert sum(len(ids) for ids, _ in batches) < 10**9 // 32


def test_no_ablations_means_no_ce_recovered_columns(source, tmp_path):
    sae = jumpscope.build("jumprelu", d_in=32, d_sae=16, site=SITE)
    results = evaluate_saes(source, {"s": sae}, 64, ablations=("none",), progress=False)
    assert "ce_loss_recovered" not in results["s"] and "ce_zero_ablated" not in results["s"]
    table = results_table(results, "causal_lm")
    assert "CE rec." not in table.splitlines()[0] and "CE rec. (zero), CE rec. (mean): not computed" in table
    zero = evaluate_saes(source, {"s": sae}, 64, ablations=("zero",), progress=False, cache_dir=tmp_path)
    assert "| CE rec. (zero) |" in results_table(zero, "causal_lm") and "ce_loss_recovered_mean" not in zero["s"]
    assert zero["s"]["delta_lm_loss"] == pytest.approx(results["s"]["delta_lm_loss"], rel=1e-6)
    both = evaluate_saes(source, {"s": sae}, 64, ablations=("zero,mean",), progress=False, cache_dir=tmp_path)
    assert both["s"]["ce_loss_recovered_zero"] == pytest.approx(zero["s"]["ce_loss_recovered_zero"], rel=1e-6)
    assert len(list(tmp_path.glob("ablation-*"))) == 2 and len(list(tmp_path.glob("clean-*"))) == 1


def _fvu(x, reconstruction):
    return ((x - reconstruction) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def test_norm_outliers_are_left_out_of_fvu_and_counted_beside_it(source, monkeypatch):
    import torch

    import jumpscope.evaluate.heldout as heldout

    real, seen = heldout.harvest, []

    def planted(*args, **kwargs):  # a massive activation at the first row of every held-out chunk
        for chunk in real(*args, **kwargs):
            chunk = {site: torch.cat([x[:1] * 1000, x[1:]]) for site, x in chunk.items()}
            seen.append(chunk[SITE])
            yield chunk

    monkeypatch.setattr(heldout, "harvest", planted)
    torch.manual_seed(0)
    sae = jumpscope.build("relu", d_in=32, d_sae=16, site=SITE)
    results = evaluate_saes(source, {"s": sae}, 128, ablations=("none",), progress=False)["s"]
    everything = torch.cat(seen)
    ordinary = torch.cat([x[1:] for x in seen])
    with torch.no_grad():
        assert results["fvu"] == pytest.approx(_fvu(ordinary, sae(ordinary)).item(), rel=1e-4)
        assert results["fvu_all_rows"] == pytest.approx(_fvu(everything, sae(everything)).item(), rel=1e-4)
    assert results["outlier_rows"] == len(seen) and results["n_tokens"] == len(ordinary)
    table = results_table({"s": results}, "causal_lm")
    assert "| FVU (all rows) |" in table.splitlines()[0] and f"leave out {len(seen)} held-out rows above 10x" in table

    kept = dataclasses.replace(source.cfg, outlier_norm_factor=0)
    seen.clear()
    off = ActivationSource(kept, [SITE], loaded=source.loaded)
    every = evaluate_saes(off, {"s": sae}, 128, ablations=("none",), progress=False)["s"]
    assert every["outlier_rows"] == 0 and every["fvu"] == pytest.approx(results["fvu_all_rows"], rel=1e-6)
    assert "FVU (all rows)" not in results_table({"s": every}, "causal_lm")


@pytest.mark.cuda
def test_on_the_gpu_the_evaluation_equals_the_cpus_and_reuses_its_cache(source, tmp_path):
    # the model, its rows and the SAE on CUDA; the second evaluation reads the clean pass back from the
    # cache on the CPU (both failed on a GPU once: the metrics' sums, then the cached targets)
    sae = jumpscope.build("jumprelu", d_in=32, d_sae=64, site=SITE, seed=0)
    on_cpu = evaluate_saes(source, {"s": sae}, 64, ablations=("zero",), progress=False)["s"]
    gpu_source = ActivationSource(source.cfg, [SITE], device="cuda")
    for _ in range(2):
        got = evaluate_saes(gpu_source, {"s": sae.to("cuda")}, 64, ablations=("zero",), progress=False,
                            cache_dir=tmp_path)["s"]
        for key in ("fvu", "l0", "ce_clean", "delta_lm_loss", "ce_loss_recovered_zero"):
            assert got[key] == pytest.approx(on_cpu[key], rel=1e-4, abs=1e-6), key
    assert len(list(tmp_path.glob("clean-*"))) == 1
