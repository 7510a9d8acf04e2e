"""The calibration sample: rows spread evenly over the run, from every whole batch, kept in checkpoints."""

import pytest
import torch

from jumpscope.sae.recipes import FIXED_LR

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


def test_a_run_stopped_early_tops_the_sample_up_from_its_latest_batch():
    sample = CalibrationSample(["x"], rows=6, total_steps=100, batch_size=4)
    assert len(sample) == 0
    for step in range(20):  # slots floor(6 s / 100): step 16 fills row 0, nothing else fills before 33
        sample.add(step, {"x": torch.arange(4.0)[:, None] + 10 * step})
    assert sample.filled == 1 and len(sample) == 5
    assert sample.sample("x").flatten().tolist() == [160, 190, 191, 192, 193]  # the kept row, then the tail


def test_the_trainer_calibrates_when_the_data_runs_out_early(caplog):
    import jumpscope

    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(256, 8, generator=generator) @ torch.randn(8, 8, generator=generator) for _ in range(5)]
    sae = jumpscope.build("jumprelu", d_in=8, d_sae=32, target_l0=4)
    trainer = jumpscope.Trainer(sae, jumpscope.TrainerConfig(total_tokens=256 * 10_000, batch_size=256,
                                                             init_sample_tokens=256, progress=False, device="cpu"))
    with caplog.at_level("WARNING"):
        trained = trainer.fit(data)
    assert "the data ran out after 5 of 10000 steps" in caplog.text
    note = trainer.calibrations[next(iter(trainer.calibrations))]
    assert note["l0_after"] == pytest.approx(4, abs=0.25)  # on the latest batch's rows: the sample had none
    with torch.no_grad():
        l0 = next(iter(trained.values())).encode(data[-1]) > 0  # the saved SAE reads raw activations
    assert l0.sum(-1).float().mean().item() == pytest.approx(4, abs=0.25)


def _trained(arch: str, rows: int = 512, **fields):
    """An SAE after a few schedule-free steps on seeded data, its optimiser, and the data."""
    import jumpscope
    from jumpscope.sae import StepContext
    from jumpscope.train.optim import make_optimizer

    generator = torch.Generator().manual_seed(0 if arch == "topk" else 2)
    x = torch.randn(rows, 8, generator=generator) @ torch.randn(8, 8, generator=generator)
    sae = jumpscope.build(arch, d_in=8, **fields)
    sae.init_from_data(x)
    optimizer = make_optimizer(sae)
    for batch in x.split(rows // 8) * (3 if arch == "topk" else 2):
        optimizer.zero_grad()
        sae.loss(batch, StepContext()).loss.backward()
        optimizer.step()
        sae.normalize_decoder_rows()
    return sae, optimizer, x


def _trained_topk():  # a fixed step, not the width rule's (0.16 at 16 latents)
    return _trained("topk", d_sae=16, k=3, lr=1.414e-2, **FIXED_LR)


def _set_points(sae, optimizer, y, x):
    """Parameters (the training point) y and an average x: z = y + (x - y) / (1 - 1/beta)."""
    beta = optimizer.param_groups[0]["beta"]
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(y[name])
            optimizer.state[param]["z"].copy_(y[name] + (x[name] - y[name]) / (1 - 1 / beta))


def test_the_better_of_average_and_training_point_is_kept():
    from jumpscope.sae import StepContext
    from jumpscope.train.calibration import finish_point, sample_fvu

    sae, optimizer, x = _trained_topk()
    good = {name: p.detach().clone() for name, p in sae.named_parameters()}
    bad = {name: p + 0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for name, p in good.items()}
    _set_points(sae, optimizer, y=good, x=bad)  # the average is the worse: the training point is kept
    note = finish_point(sae, optimizer, x, x, StepContext())
    assert note["kept_training_point"] == 1.0 and note["sample_fvu_training_point"] < note["sample_fvu_average"]
    optimizer.use_average()
    for name, param in sae.named_parameters():
        assert torch.equal(param, good[name]), name  # the "average" is now exactly the training point
    assert sample_fvu(sae, x, x) == note["sample_fvu_training_point"]

    sae, optimizer, x = _trained_topk()  # a training point better by less than the margin: the average stays
    slightly = {name: good[name] + 0.02 * (bad[name] - good[name]) for name in good}
    _set_points(sae, optimizer, y=good, x=slightly)
    note = finish_point(sae, optimizer, x, x, StepContext(), margin=0.1)
    assert note["sample_fvu_training_point"] < note["sample_fvu_average"] < 1.1 * note["sample_fvu_training_point"]
    assert note["kept_training_point"] == 0.0
    assert finish_point(*_trained_topk(), x, StepContext(), margin=None) == {}  # no comparison at all

    sae, optimizer, x = _trained_topk()
    _set_points(sae, optimizer, y=bad, x=good)  # the training point is the worse: the average stays
    note = finish_point(sae, optimizer, x, x, StepContext())
    assert note["kept_training_point"] == 0.0 and note["sample_fvu_average"] < note["sample_fvu_training_point"]
    optimizer.use_average()
    for name, param in sae.named_parameters():
        assert torch.allclose(param, good[name], atol=1e-4), name
    assert finish_point(sae, optimizer, x, x, StepContext()) == {}  # nothing to choose (TopK: nothing to calibrate)


def test_jumprelu_points_are_compared_each_at_its_calibrated_l0():
    from jumpscope.sae import StepContext
    from jumpscope.train.calibration import finish_point, sample_fvu

    sae, optimizer, x = _trained("jumprelu", rows=1024, d_sae=32, target_l0=4)
    note = finish_point(sae, optimizer, x, x, StepContext())
    optimizer.use_average()  # the saved weights: whichever point was kept, calibrated
    l0 = (sae.encode(x) > 0).sum(-1).double().mean().item()
    assert 4 - 0.01 <= l0 <= 4 and note["l0_after"] == pytest.approx(l0)
    kept = "sample_fvu_training_point" if note["kept_training_point"] else "sample_fvu_average"
    assert sample_fvu(sae, x, x) == pytest.approx(note[kept], rel=1e-6)
