"""The refit's rows: spread over the run, on disk with an output folder, cut back on resume."""

import importlib
from types import SimpleNamespace

import pytest
import torch

from jumpscope.train import Trainer, TrainerConfig
from jumpscope.train.refit_rows import FOLDER, RefitRows
from recipes import adam_build


def batches(n, rows=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(rows, 5, generator=generator), "b": torch.randn(rows, 3, generator=generator)}
            for _ in range(n)]


def kept(store, key):
    return torch.cat(list(store.chunks(key, chunk_rows=50)))


@pytest.mark.parametrize("on_disk", [False, True])
def test_rows_are_spread_evenly_over_the_run(tmp_path, on_disk):
    data = batches(8)
    store = RefitRows(["b", "a"], rows=100, total_steps=8, batch_size=64, folder=tmp_path if on_disk else None)
    for step, batch in enumerate(data):
        store.add(step, batch)
    assert len(store) == 100
    expected = torch.cat([batch["a"][: (step + 1) * 100 // 8 - step * 100 // 8] for step, batch in enumerate(data)])
    assert torch.equal(kept(store, "a"), expected)
    assert kept(store, "b").shape == (100, 3)
    assert (tmp_path / FOLDER).exists() == on_disk
    store.remove()
    assert not (tmp_path / FOLDER).exists()


def test_a_resumed_store_cuts_the_files_back_to_the_checkpoints_count(tmp_path):
    data = batches(6)
    first = RefitRows(["a"], rows=6 * 64, total_steps=6, batch_size=64, folder=tmp_path)
    for step in range(4):
        first.add(step, data[step])
    state = first.state()
    first.add(4, data[4])  # written after the checkpoint: a killed run's tail
    second = RefitRows(["a"], rows=6 * 64, total_steps=6, batch_size=64, folder=tmp_path)
    second.restore({f"{key}": value for key, value in state.items()}, finished=False)
    for step in (4, 5):
        second.add(step, data[step])
    assert torch.equal(kept(second, "a"), torch.cat([batch["a"] for batch in data]))


def test_rows_lost_with_the_folder_are_named_and_the_refit_takes_the_rows_from_then_on(tmp_path, caplog):
    data = batches(2)
    store = RefitRows(["a"], rows=128, total_steps=2, batch_size=64, folder=tmp_path)
    store.add(0, data[0])
    state = store.state()
    (tmp_path / FOLDER / "rank0" / "0.f32").write_bytes(b"\0" * 12)
    again = RefitRows(["a"], rows=128, total_steps=2, batch_size=64, folder=tmp_path)
    again.restore(state, finished=True)  # a finished run's checkpoint holds the refit SAE: no rows needed
    assert len(again) == 64
    again = RefitRows(["a"], rows=128, total_steps=2, batch_size=64, folder=tmp_path)
    again.restore(state, finished=False)
    assert "0.f32 holds fewer than the 64 rows" in caplog.text
    again.add(1, data[1])
    assert torch.equal(kept(again, "a"), data[1]["a"])


def test_a_run_with_an_output_folder_refits_as_one_in_memory_and_leaves_no_rows(tmp_path):
    def run(out_dir):
        cfg = TrainerConfig(total_tokens=64 * 10, batch_size=64, init_sample_tokens=64, progress=False,
                            device="cpu", out_dir=out_dir, checkpoint_every=3, decoder_refit_tokens=640)
        sae = adam_build("topk", d_in=5, d_sae=16, k=2, seed=0)
        return Trainer({"s": sae}, cfg).fit(iter([batch["a"] for batch in batches(10)]))["s"]

    in_memory, on_disk = run(None), run(str(tmp_path / "run"))
    assert torch.equal(in_memory.W_dec, on_disk.W_dec)
    assert not torch.allclose(in_memory.W_dec.norm(dim=1), torch.ones(16))  # refit: TopK's rows off unit norm
    assert not (tmp_path / "run" / FOLDER).exists()


def test_an_interrupted_run_with_the_refit_resumes_to_identical_weights(tmp_path):
    """Killed after step 7 (checkpoint at 6: the files hold a row tail the checkpoint does not count),
    resumed: the refit reads the rows an uninterrupted run's does."""
    data = [batch["a"] for batch in batches(10)]

    def trainer(out_dir):
        cfg = TrainerConfig(total_tokens=64 * 10, batch_size=64, init_sample_tokens=64, progress=False,
                            device="cpu", out_dir=str(out_dir), checkpoint_every=3, decoder_refit_tokens=640)
        return Trainer({"s": adam_build("topk", d_in=5, d_sae=16, k=2, seed=0)}, cfg)

    def crashing():
        for index, batch in enumerate(data):
            if index == 8:
                raise RuntimeError("simulated kill")
            yield batch

    reference = trainer(tmp_path / "ref").fit(iter(data))["s"]
    with pytest.raises(RuntimeError, match="simulated kill"):
        trainer(tmp_path / "run").fit(crashing())
    assert (tmp_path / "run" / FOLDER).exists()
    resumed = trainer(tmp_path / "run").fit(iter(data), resume=True)["s"]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize("on_disk", [False, True])
def test_rows_beyond_the_free_space_are_not_kept_and_a_resumed_run_keeps_the_smaller_count(
        tmp_path, monkeypatch, caplog, on_disk):
    module = importlib.import_module("jumpscope.train.refit_rows")
    row_bytes = 4 * 5  # one float32 row of "a"
    if on_disk:  # 9/10 of the disk's free bytes may hold rows: room for 90
        monkeypatch.setattr(module.shutil, "disk_usage", lambda path: SimpleNamespace(free=100 * row_bytes))
    else:  # half the free memory: room for 90
        monkeypatch.setattr(module, "available_memory", lambda device: 180 * row_bytes)
    data = batches(8)
    store = RefitRows(["a"], rows=400, total_steps=8, batch_size=64, folder=tmp_path if on_disk else None)
    for step in range(4):
        store.add(step, data[step])
    assert "the 400 rows still to keep need" in caplog.text and "keeping about 90" in caplog.text
    state = store.state()
    again = RefitRows(["a"], rows=400, total_steps=8, batch_size=64, folder=tmp_path if on_disk else None)
    again.restore(state, finished=False)
    again.kept = store.kept
    for step in range(4, 8):
        again.add(step, data[step])
    assert again.rows == store.rows == 90 and len(again) == 90  # spread over the run, at most what fits
    assert kept(again, "a").shape == (90, 5)


def test_the_rows_still_to_come_set_the_count_when_the_check_happens_mid_run(tmp_path, monkeypatch):
    module = importlib.import_module("jumpscope.train.refit_rows")
    monkeypatch.setattr(module.shutil, "disk_usage", lambda path: SimpleNamespace(free=int(60 * 20 / 0.9) + 1))
    store = RefitRows(["a"], rows=400, total_steps=8, batch_size=64, folder=tmp_path)
    store.filled = 200  # a resumed run at step 4 whose checkpoint counted 200 rows, with room left for 60
    (tmp_path / FOLDER / "rank0").mkdir(parents=True)
    (tmp_path / FOLDER / "rank0" / "0.f32").write_bytes(b"\0" * 200 * 20)
    data = batches(8)
    for step in range(4, 8):
        store.add(step, data[step])
    assert 200 + 55 <= len(store) <= 200 + 60


def test_rows_reach_the_files_a_flush_at_a_time_and_all_of_them_before_a_checkpoint(tmp_path, monkeypatch):
    module = importlib.import_module("jumpscope.train.refit_rows")
    data = batches(4)
    path = tmp_path / FOLDER / "rank0" / "0.f32"
    monkeypatch.setattr(module, "FLUSH_BYTES", 1 << 40)  # never by size: only at a checkpoint or a read
    store = RefitRows(["a"], rows=4 * 64, total_steps=4, batch_size=64, folder=tmp_path)
    store.add(0, data[0])
    store.add(1, data[1])
    assert path.stat().st_size == 0 and len(store) == 128
    state = store.state()
    assert path.stat().st_size == 128 * 5 * 4 and int(state["refit.filled"]) == 128
    monkeypatch.setattr(module, "FLUSH_BYTES", 64 * 5 * 4)  # one step's rows
    store.add(2, data[2])
    assert path.stat().st_size == 192 * 5 * 4
    store.add(3, data[3])
    assert torch.equal(kept(store, "a"), torch.cat([batch["a"] for batch in data]))


@pytest.mark.cuda
def test_rows_from_gpu_batches_reach_the_host_unchanged(tmp_path):
    data = batches(4)
    store = RefitRows(["a", "b"], rows=4 * 64, total_steps=4, batch_size=64, folder=tmp_path)
    for step, batch in enumerate(data):
        store.add(step, {key: value.cuda() for key, value in batch.items()})
    assert torch.equal(kept(store, "a"), torch.cat([batch["a"] for batch in data]))
    assert torch.equal(kept(store, "b"), torch.cat([batch["b"] for batch in data]))
