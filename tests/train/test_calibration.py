"""The calibration sample: rows spread evenly over the run, from every whole batch, kept in checkpoints."""

import torch

from jumpscope.train.calibration import CalibrationSample


def test_sample_takes_n_rows_spread_evenly_from_the_start_of_each_batch():
    sample = CalibrationSample(["input", "input"], rows=10, total_steps=4, batch_size=8)
    batches = [{"input": torch.arange(8.0)[:, None] + 100 * step, "target": torch.zeros(8, 1)} for step in range(4)]
    for step, batch in enumerate(batches):
        sample.add(step, batch)
    # slots floor(10 s / 4): 0, 2, 5, 7, 10 -> 2, 3, 2, 3 rows
    assert sample.sample("input").flatten().tolist() == [0, 1, 100, 101, 102, 200, 201, 300, 301, 302]
    assert sample.keys == ["input"] and len(sample) == 10


def test_sample_is_capped_at_the_rows_of_the_run_and_restores_from_its_state():
    sample = CalibrationSample(["x"], rows=1000, total_steps=3, batch_size=4)
    assert sample.rows == 12  # never more than the run's rows: every step fills its slots
    for step in range(2):
        sample.add(step, {"x": torch.full((4, 2), float(step))})
    state = sample.state()
    assert state["calibration.x"].shape == (8, 2)
    again = CalibrationSample(["x"], rows=1000, total_steps=3, batch_size=4)
    again.restore(state, torch.device("cpu"))
    again.add(2, {"x": torch.full((4, 2), 2.0)})
    sample.add(2, {"x": torch.full((4, 2), 2.0)})
    assert torch.equal(again.sample("x"), sample.sample("x")) and len(again) == 12
    fresh = CalibrationSample(["x"], rows=8, total_steps=3, batch_size=4)
    fresh.restore({}, torch.device("cpu"))  # a checkpoint from before samples were kept: nothing
    assert len(fresh) == 0
