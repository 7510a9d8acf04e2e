"""The progress display: one status line per site when SAEs train at several sites, and the
harvest that fills the shuffle buffer (or the cache) shown before the first step."""

import json

import pytest

from jumpscope.cli import main
from jumpscope.train.progress import ProgressReporter
from tiny_causal_lm import write_corpus, write_tiny_causal_lm


def row(l0, fvu):
    return {"l0": l0, "fvu": fvu, "dead_fraction": 0.0}


def test_every_site_gets_its_own_status_line(tmp_path):
    sites = {"a8": "layers.0.resid_post", "a16": "layers.0.resid_post", "b8": "layers.1.mlp_out"}
    with ProgressReporter(tmp_path / "log.jsonl", total=10, enabled=True, sites=sites) as reporter:
        reporter.report(2, 200, {"a8": row(8.0, 0.3), "a16": row(16.0, 0.2), "b8": row(7.5, 0.4)})
        lines = {site: line.desc for site, line in reporter.site_lines.items()}
    assert set(lines) == {"layers.0.resid_post", "layers.1.mlp_out"}
    assert "a8: L0 8.0 FVU 0.300" in lines["layers.0.resid_post"] and "a16: L0 16.0" in lines["layers.0.resid_post"]
    assert "b8: L0 7.5 FVU 0.400" in lines["layers.1.mlp_out"] and "a8" not in lines["layers.1.mlp_out"]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3


def test_one_site_keeps_the_single_bar(tmp_path):
    with ProgressReporter(None, total=10, enabled=True, sites={"a": "s", "b": "s"}) as reporter:
        assert reporter.site_lines == {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    return write_tiny_causal_lm(root / "model"), write_corpus(root / "corpus.txt")


def train_argv(tiny, out, *extra):
    model, corpus = tiny
    return ["train", "--model", str(model), "--corpus", str(corpus), "--txt-split", "paragraph", "--context-size",
            "32", "--model-batch-size", "4", "--site", "layers.1.resid_post", "--width", "32", "--target-l0", "4",
            "--tokens", "1024", "--batch-size", "256", "--init-sample-tokens", "256", "--shuffle-buffer-tokens", "768",
            "--eval-tokens", "128", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.parametrize("cache,bar", [(False, "harvesting (filling the shuffle buffer)"),
                                       (True, "harvesting (to the cache)")])
def test_harvesting_shows_progress_before_the_first_step(tiny, tmp_path, capsys, cache, bar):
    extra = ["--cache", str(tmp_path / "cache"), "--cache-shard-rows", "256"] if cache else []
    assert main(train_argv(tiny, tmp_path / "run", *extra)) == 0
    err = capsys.readouterr().err
    assert bar in err and "tok/s" in err
    assert err.index(bar) < err.index("step/s")  # the harvest is shown before the step bar appears
    final = err.replace("\r", "\n").split("\n")
    assert any(line.startswith(bar + ": 100%") and "/768 " in line for line in final) if not cache else \
        any(line.startswith(bar + ": 100%") and "/1.02k " in line for line in final)  # the buffer; all tokens
    if cache:  # --cache-shard-rows reached the writer
        manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
        assert manifest["shard_rows"] == 256 and manifest["total_tokens"] >= 1024
        assert [shard["rows"] for shard in manifest["shards"][:-1]] == [256] * (len(manifest["shards"]) - 1)
        assert len(manifest["shards"]) == -(-manifest["total_tokens"] // 256)
    assert main(train_argv(tiny, tmp_path / "quiet", "--no-progress", *extra)) == 0
    err = capsys.readouterr().err
    assert "harvesting" not in err and "step/s" not in err


def test_the_dead_fraction_names_its_window(tmp_path):
    with ProgressReporter(None, total=10, enabled=True, dead_window=2_500_000) as reporter:
        reporter.report(2, 200, {"a": row(8.0, 0.3)})
        assert reporter.bar.postfix.endswith("dead 0.0% (no fire in 2.5M tok)")
    with ProgressReporter(None, total=10, enabled=True) as reporter:  # a caller that does not say
        reporter.report(2, 200, {"a": row(8.0, 0.3)})
        assert reporter.bar.postfix.endswith("dead 0.0%")
