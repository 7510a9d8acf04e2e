"""Training across processes under torchrun (gloo on CPU): data parallelism equals one process on
the same global batches, only the main process writes, resume is exact, and with
distribute="saes" every process trains (and writes) its own SAEs.

One torchrun launch (tests/helpers/distributed_worker.py) runs every scenario: starting torch and its
compiler stack in two processes costs more than all of the training.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import distributed_worker as worker
from jumpscope.train import Trainer
from jumpscope.train.distributed import SingleProcess, process_group_from_env, shard_batch

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with the gloo backend")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RUN_ID")
APPROXIMATE = ("batchtopk",)  # statistics over the batch taken per process


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Run the worker under torchrun with two processes; (output folder, results folder)."""
    root = tmp_path_factory.mktemp("torchrun")
    env = {key: value for key, value in os.environ.items() if key not in TORCHRUN_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).parents[1] / "helpers" / "distributed_worker.py"), "--out", str(root / "out"),
               "--results", str(root / "results")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return root / "out", root / "results"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Each suite trained in this process on the same global batches: (out folder, weights, summary)."""
    references = {}
    for suite in ("data", "saes"):
        out = tmp_path_factory.mktemp(f"single_{suite}")
        trainer = Trainer(worker.make_saes(suite), worker.config(suite, str(out)), SingleProcess())
        trained = trainer.fit(worker.stream())
        references[suite] = out, worker.flat_state(trained), trainer.final_summary()
    return references


def weights(results: Path, scenario: str, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(results / f"{scenario}.rank{rank}.safetensors"))


def of(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if key.split(".")[0] == name}


def assert_close(actual, expected, names, atol=1e-5, rtol=1e-4):
    for name in names:
        for key, value in of(expected, name).items():
            assert torch.allclose(actual[key], value, atol=atol, rtol=rtol), \
                f"{key}: max difference {(actual[key] - value).abs().max().item():.3g}"


def assert_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), f"{key} differs"


def log_rows(path: Path) -> dict[tuple[int, str], dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    rows = {(line["step"], line["sae"]): line for line in lines}
    assert len(rows) == len(lines), "a (step, sae) pair was logged twice"
    return rows


@needs_gloo
def test_data_parallel_equals_one_process_on_the_same_global_batches(launch, one_process):
    _, results = launch
    reference = one_process["data"][1]
    rank0, rank1 = weights(results, "data_full", 0), weights(results, "data_full", 1)
    assert_equal(rank1, rank0)  # the same SAEs on every process
    assert_close(rank0, reference, worker.EXACT)
    for name in APPROXIMATE:  # per-process batch statistics: trained, identical on every process, not exact
        assert all(torch.isfinite(value).all() for value in of(rank0, name).values())
    assert json.loads((results / "data_full.rank1.json").read_text())["world_size"] == 2


@needs_gloo
def test_data_parallel_logs_and_summaries_describe_the_whole_batch(launch, one_process):
    out, results = launch
    single_out = one_process["data"][0]
    parallel, single = log_rows(out / "data_full" / "rank0" / "train_log.jsonl"), log_rows(single_out / "train_log.jsonl")
    assert parallel.keys() == single.keys()
    for (step, name), row in single.items():
        if name in worker.EXACT:
            for key, value in row.items():
                if isinstance(value, float):
                    assert parallel[step, name][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, name, key)
    summary = json.loads((results / "data_full.rank0.json").read_text())["summary"]
    expected = one_process["data"][2]
    for name in worker.EXACT:
        for key in ("n_tokens", "l0", "fvu", "mse", "cosine", "dead_fraction", "dense_fraction"):
            assert summary[name][key] == pytest.approx(expected[name][key], rel=1e-5, abs=1e-7), (name, key)


@needs_gloo
def test_only_the_main_process_writes_under_data_parallelism(launch):
    out, _ = launch
    assert not (out / "data_full" / "rank1").exists()
    written = {path.name for path in (out / "data_full" / "rank0").iterdir()}
    assert written == {"checkpoint.safetensors", "train_log.jsonl", *worker.make_saes("data")}


@needs_gloo
def test_resume_under_torchrun_equals_an_uninterrupted_run(launch):
    out, results = launch
    for suite in ("data", "saes"):
        crashed = load_file(str(results / f"{suite}_resume.crash_checkpoint.safetensors"))
        assert crashed, "the interrupted run left a checkpoint"
        for rank in (0, 1):
            assert_equal(weights(results, f"{suite}_resume", rank), weights(results, f"{suite}_full", 0))
        rows = log_rows(out / f"{suite}_resume" / "train_log.jsonl")
        assert {step for step, _ in rows} == set(range(4, worker.STEPS + 1, 4))
        assert {name for _, name in rows} == set(worker.make_saes(suite))


@needs_gloo
def test_one_process_resumes_a_checkpoint_written_under_torchrun(launch, one_process, tmp_path):
    _, results = launch
    for suite, names in (("data", worker.EXACT), ("saes", tuple(worker.make_saes("saes")))):
        folder = tmp_path / suite
        folder.mkdir()
        shutil.copy(results / f"{suite}_resume.crash_checkpoint.safetensors", folder / "checkpoint.safetensors")
        shutil.copytree(results / f"{suite}_resume.crash_refit_rows", folder / "refit_rows")  # the run folder's
        trainer = Trainer(worker.make_saes(suite), worker.config(suite, str(folder)), SingleProcess())
        resumed = worker.flat_state(trainer.fit(worker.stream(), resume=True))
        assert_close(resumed, one_process[suite][1], names)


@needs_gloo
def test_each_process_trains_and_writes_its_own_saes(launch, one_process):
    out, results = launch
    names = set(worker.make_saes("saes"))
    trained_here = [set(json.loads((results / f"saes_full.rank{rank}.json").read_text())["trained_here"])
                    for rank in (0, 1)]
    assert trained_here[0] | trained_here[1] == names and not trained_here[0] & trained_here[1]
    assert len(trained_here[0]) == len(trained_here[1]) == 2
    assert {path.name for path in (out / "saes_full" / "rank1").iterdir()} == trained_here[1]
    assert {path.name for path in (out / "saes_full" / "rank0").iterdir()} == \
        trained_here[0] | {"checkpoint.safetensors", "train_log.jsonl"}
    for rank in (0, 1):  # every process's summary and scales cover every SAE, its own and the others'
        record = json.loads((results / f"saes_full.rank{rank}.json").read_text())
        assert set(record["summary"]) == names
        assert record["scales"] == [sorted(names), sorted(names)]  # the jsae job reads every pair's scales
    assert {name for _, name in log_rows(out / "saes_full" / "rank0" / "train_log.jsonl")} == names
    initial = worker.flat_state(worker.make_saes("saes"))
    for rank in (0, 1):  # every process returns every SAE, trained by its owner as in one process
        state = weights(results, "saes_full", rank)
        assert_equal(state, one_process["saes"][1])
        for name in names:
            assert not torch.equal(state[f"{name}.W_dec"], initial[f"{name}.W_dec"]), f"{name} was not trained"


class TwoProcesses(SingleProcess):
    rank, world_size = 0, 2


def test_sae_sets_that_do_not_divide_over_the_processes_are_clear_errors():
    saes = worker.make_saes("saes")
    config = worker.config("saes", None)
    for count in (3, 1):
        with pytest.raises(ValueError, match=rf"number of SAEs \({count}\) to be a multiple of the number of "
                                             r"processes \(2\)"):
            Trainer(dict(list(saes.items())[:count]), config, TwoProcesses())
    assert len(Trainer(saes, config, TwoProcesses()).saes) == 2
    data_config = worker.config("data", None)
    data_config.batch_size = 1
    with pytest.raises(ValueError, match="smaller than the number of processes"):
        Trainer(saes, data_config, TwoProcesses())


def test_without_torchrun_training_is_one_process(monkeypatch):
    for variable in TORCHRUN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert type(process_group_from_env()) is SingleProcess


def test_batches_split_into_contiguous_weighted_slices():
    batch = {"input": torch.arange(7.0)[:, None].expand(7, 3)}
    slices = [shard_batch(batch, rank, 3) for rank in range(3)]
    assert torch.equal(torch.cat([part["input"] for part, _ in slices]), batch["input"])
    assert [weight for _, weight in slices] == [3 / 7, 2 / 7, 2 / 7]
    whole, weight = shard_batch(batch, 0, 1)
    assert whole is batch and weight == 1.0
