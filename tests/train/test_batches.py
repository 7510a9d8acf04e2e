"""Batch checks of train/batches.py."""

import pytest
import torch

from jumpscope.sae import build
from jumpscope.train import Trainer, TrainerConfig
from jumpscope.train.batches import check_finite, copied_ahead


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_is_named_with_its_row(bad):
    batch = torch.zeros(6, 4)
    batch[4, 1] = bad
    with pytest.raises(ValueError, match=r"non-finite activations .* 'input' .* step 7, rows \[4\]"):
        check_finite({"input": batch}, step=7)


def test_finite_values_whose_sum_overflows_pass():
    # the quick screen sums the batch: 3e38 * 4 is inf in float32, yet every value is finite
    batch = torch.full((2, 2), 3e38)
    check_finite({"input": batch, "target": -batch}, step=0)
    batch[1, 1] = float("nan")  # and a NaN among them is still found
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        check_finite({"input": batch}, step=0)


def batches_of(count, rows=8, width=4, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return [{"input": torch.randn(rows, width, generator=generator).to(dtype)} for _ in range(count)]


def test_copied_ahead_leaves_cpu_batches_as_they_are():
    batches = batches_of(3)
    out = list(copied_ahead(iter(batches), torch.device("cpu")))
    assert [b["input"] is a["input"] for a, b in zip(batches, out)] == [True] * 3


def test_the_trainer_draws_no_batch_beyond_its_last_step():
    # prefetching draws ahead: it must stop at the run's last batch (a model-in-the-loop source
    # would otherwise harvest a batch for nothing)
    drawn = []

    def source():
        for index, batch in enumerate(batches_of(10)):
            drawn.append(index)
            yield batch["input"]

    cfg = TrainerConfig(total_tokens=8 * 4, batch_size=8, init_sample_tokens=8, progress=False, device="cpu")
    Trainer(build("relu", d_in=4, d_sae=8, seed=0), cfg).fit(source())
    assert drawn == [0, 1, 2, 3]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pinned", [False, True])
def test_copied_ahead_delivers_each_host_batch_on_the_gpu_unchanged(dtype, pinned):
    batches = batches_of(5, rows=1024, width=64, dtype=dtype)
    if pinned:
        batches = [{"input": b["input"].pin_memory()} for b in batches]
    device = torch.device("cuda")
    out = [{k: v.clone() for k, v in b.items()} for b in copied_ahead(iter(batches), device)]
    assert len(out) == 5
    for got, sent in zip(out, batches):
        assert got["input"].device.type == "cuda" and got["input"].dtype == dtype
        assert torch.equal(got["input"].cpu(), sent["input"])


@pytest.mark.cuda
def test_copied_ahead_is_safe_when_the_caller_refills_its_pinned_buffer():
    buffer = torch.empty(4096, 256).pin_memory()

    def refilled():
        for value in range(6):
            buffer.fill_(value)  # a loader reusing one pinned buffer in place
            yield {"input": buffer}

    seen = [b["input"][0, 0].item() for b in copied_ahead(refilled(), torch.device("cuda"))]
    assert seen == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
