"""Harvesting split across torchrun processes (gloo on CPU): each process runs the model on its own
half of the windows, yet every process trains on the batches one process would see, so the weights
equal a one-process run; caches written by 2 processes equal those written by 1 and either reads
them; a SIGKILL mid-run (or mid-cache) resumes with another process count to the same weights.

One torchrun launch runs every scenario of tests/helpers/harvest_worker.py; the one-process
references run here, through the same function."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import harvest_worker as worker
from jumpscope.activations.source import gather_in_order
from jumpscope.data.cache import CacheReader
from jumpscope.train.distributed import SingleProcess
from tiny_causal_lm import write_corpus, write_tiny_causal_lm

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with the gloo backend")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def torchrun(root: Path, scenarios: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in TORCHRUN_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "helpers"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).parents[1] / "helpers" / "harvest_worker.py"), "--root", str(root),
               "--scenarios", scenarios]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("split_harvest")
    write_tiny_causal_lm(root / "model")
    write_corpus(root / "corpus.txt", n_docs=200)
    return root


@pytest.fixture(scope="module")
def one_process(root):
    """Every scenario in this process (one thread, as the workers), cache_1 written first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {scenario: worker.run(scenario, root, None, SingleProcess())
                for scenario in ("cache_data", "live_data", "live_saes")}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def launch(root, one_process):
    done = torchrun(root, "live_data,live_saes,cache_data,read_data,job")
    if done.returncode:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return root / "results"


def rank_result(results: Path, scenario: str, rank: int) -> tuple[dict, dict]:
    return (load_file(str(results / f"{scenario}.rank{rank}.safetensors")),
            json.loads((results / f"{scenario}.rank{rank}.json").read_text()))


def assert_close(actual: dict, expected: dict, atol=1e-5, rtol=1e-4):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(actual[key], value, atol=atol, rtol=rtol), \
            f"{key}: max difference {(actual[key] - value).abs().max().item():.3g}"


@pytest.mark.parametrize("scenario", ["live_data", "live_saes"])
def test_each_process_runs_the_model_on_half_the_windows_and_trains_as_one_process(launch, one_process, scenario):
    reference = one_process[scenario]
    seen = []
    for rank in (0, 1):
        weights, record = rank_result(launch, scenario, rank)
        assert record["world_size"] == 2
        assert_close(weights, reference["weights"])
        seen.append(record["forward_tokens"])
    # windows of 32 tokens in batches of 4: batch i on process i mod 2, so the two shares differ
    # by at most one batch and together are what one process ran, rounded up to a whole round
    # (the rows are gathered a batch from each process at a time)
    one_batch = worker.MODEL_BATCH * worker.CONTEXT
    assert abs(seen[0] - seen[1]) <= one_batch
    assert 0 < reference["forward_tokens"] <= sum(seen) <= reference["forward_tokens"] + one_batch
    if scenario == "live_saes":
        mine = [set(rank_result(launch, scenario, rank)[1]["trained_here"]) for rank in (0, 1)]
        assert not mine[0] & mine[1] and len(mine[0]) == len(mine[1]) == 2


def test_a_cache_written_by_two_processes_equals_one_written_by_one(launch, root, one_process):
    two, one = CacheReader(root / "cache_2"), CacheReader(root / "cache_1")
    assert two.total_tokens == one.total_tokens > 0
    assert [shard["rows"] for shard in two.manifest["shards"]] == [shard["rows"] for shard in one.manifest["shards"]]
    for a, b in zip(two.manifest["shards"], one.manifest["shards"]):
        assert a["sha256"] == b["sha256"]  # shard content for shard content
    weights, record = rank_result(launch, "cache_data", 1)
    assert record["forward_tokens"] < one_process["cache_data"]["forward_tokens"]
    assert_close(weights, one_process["cache_data"]["weights"])


def test_either_process_count_reads_the_other_ones_cache(launch, root, one_process):
    for rank in (0, 1):  # two processes read the cache one process wrote ...
        weights, record = rank_result(launch, "read_data", rank)
        assert record["forward_tokens"] == 0  # the model never ran
        assert_close(weights, one_process["cache_data"]["weights"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # ... and one process reads the cache two wrote
        read = worker.run("readtwo_data", root, None, SingleProcess())
    finally:
        torch.set_num_threads(threads)
    assert read["forward_tokens"] == 0
    assert_close(read["weights"], one_process["cache_data"]["weights"])


def test_a_killed_run_resumes_with_another_process_count_to_the_same_weights(root, one_process, launch):
    died = torchrun(root, "kill_data,killcache_data")
    assert died.returncode != 0, "the worker was meant to die"
    checkpoint = root / "runs" / "kill_data" / "checkpoint.safetensors"
    assert checkpoint.is_file(), "the killed run left no checkpoint"
    partial = json.loads((root / "killcache" / "manifest.json").read_text()) \
        if (root / "killcache" / "manifest.json").is_file() else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = worker.run("kill_data", root, None, SingleProcess(), resume=True)
        cached = worker.run("killcache_data", root, None, SingleProcess(), resume=True)
    finally:
        torch.set_num_threads(threads)
    assert_close(resumed["weights"], one_process["live_data"]["weights"])
    assert_close(cached["weights"], one_process["cache_data"]["weights"])
    assert partial is None or not partial.get("complete")
    assert CacheReader(root / "killcache").total_tokens == CacheReader(root / "cache_1").total_tokens


def test_the_train_job_under_torchrun_splits_training_and_evaluation_and_matches_one_process(launch, root):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = worker.run_job(root, root / "runs" / "job_1")
    finally:
        torch.set_num_threads(threads)
    shares = []
    for rank in (0, 1):
        assert_close(load_file(str(launch / f"job.rank{rank}.safetensors")), single["weights"])
        shares.append(json.loads((launch / f"job.rank{rank}.json").read_text())["eval_tokens_seen"])
    # each process evaluated its own share of the held-out windows
    assert sum(shares) == single["eval_tokens_seen"] > 0 and 0 < shares[1] <= shares[0] < sum(shares)
    two = json.loads((root / "runs" / "job_2" / "summary.json").read_text())["held_out"][worker.SITE]
    one = json.loads((root / "runs" / "job_1" / "summary.json").read_text())["held_out"][worker.SITE]
    assert two["n_tokens"] == one["n_tokens"] > 0
    for key in ("fvu", "l0", "mse", "dead_fraction", "delta_lm_loss", "kl_div", "ce_loss_recovered_zero",
                "ce_loss_recovered_mean", "n_predictions"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_gather_in_order_interleaves_the_processes_shares():
    class Fake:
        """Process ``rank`` of 2, with the other process's chunks given."""

        rank, world_size = 0, 2

        def __init__(self, other):
            self.other = iter(other)

        def all_gather_object(self, value):
            return [value, next(self.other, None)]

    chunk = lambda i: {"s": torch.full((1, 2), float(i))}  # noqa: E731
    mine, theirs = [chunk(0), chunk(2), chunk(4)], [chunk(1), chunk(3)]
    got = [int(c["s"][0, 0]) for c in gather_in_order(mine, Fake(theirs))]
    assert got == [0, 1, 2, 3, 4]
