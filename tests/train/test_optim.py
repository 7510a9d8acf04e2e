"""Optimisers and schedules: the schedule-free sign step against a hand computation, warm-ups as
fractions, and the warnings for schedules that do not fit the run."""

import logging
import math

import pytest
import torch

import jumpscope
from jumpscope.train.optim import (ScheduleFreeSignSGD, lr_factor, make_optimizer, peak_lr, schedule_warnings,
                                   sparsity_factor)


def _step(optimizer, p, grad):
    p.grad = torch.tensor(grad)
    optimizer.step()


def test_schedule_free_sign_step_matches_a_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    lr, beta = 0.1, 0.75
    optimizer = ScheduleFreeSignSGD([p], lr=lr, beta=beta)
    # step 1: z0 = x0 = y0 = p0; z1 = p0 - lr sign(g1); c1 = 1, so x1 = z1 and y1 = z1
    _step(optimizer, p, [3.0, -0.2, 0.0])
    z1 = [1.0 - 0.1, -2.0 + 0.1, 0.5]
    assert p.tolist() == pytest.approx(z1)
    # step 2: x1 = z1; z2 = z1 - lr sign(g2); c2 = 1/2: x2 = (x1 + z2) / 2; y2 = beta x2 + (1 - beta) z2
    _step(optimizer, p, [-1.0, -1.0, 2.0])
    z2 = [0.9 + 0.1, -1.9 + 0.1, 0.5 - 0.1]
    x2 = [(a + b) / 2 for a, b in zip(z1, z2)]
    y2 = [beta * a + (1 - beta) * b for a, b in zip(x2, z2)]
    assert p.tolist() == pytest.approx(y2)
    # step 3 with the gradient at y2: x2 recovered from (y2, z2); c3 = 1/3
    _step(optimizer, p, [1.0, 1.0, 1.0])
    z3 = [b - 0.1 for b in z2]
    x3 = [a + (b - a) / 3 for a, b in zip(x2, z3)]
    assert p.tolist() == pytest.approx([beta * a + (1 - beta) * b for a, b in zip(x3, z3)])
    optimizer.use_average()
    assert p.tolist() == pytest.approx(x3)
    with pytest.raises(RuntimeError, match="use_training_point"):
        _step(optimizer, p, [1.0, 1.0, 1.0])
    optimizer.use_training_point()
    assert p.tolist() == pytest.approx([beta * a + (1 - beta) * b for a, b in zip(x3, z3)])


def test_a_constant_rate_averages_uniformly_and_a_warm_up_weights_by_lr_squared():
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = ScheduleFreeSignSGD([p], lr=1.0, beta=0.5)
    zs = []
    for lr in (0.5, 1.0, 1.0):  # a warm-up: the first iterate counts with weight 0.5^2
        optimizer.param_groups[0]["lr"] = lr
        _step(optimizer, p, [-1.0])  # every step moves z up by lr
        zs.append((zs[-1] if zs else 0.0) + lr)
    optimizer.use_average()
    weights = [0.25, 1.0, 1.0]
    assert p.item() == pytest.approx(sum(w * z for w, z in zip(weights, zs)) / sum(weights))


def test_average_power_weighs_step_t_by_t_to_the_r():
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = ScheduleFreeSignSGD([p], lr=1.0, beta=0.5, average_power=2.0)
    for _ in range(4):
        _step(optimizer, p, [-1.0])  # z_t = t
    optimizer.use_average()
    assert p.item() == pytest.approx(sum(t ** 2 * t for t in range(1, 5)) / sum(t ** 2 for t in range(1, 5)))
    sae = jumpscope.build("topk", d_in=4, d_sae=8, k=2, schedule_free_average_power=1.5)
    assert make_optimizer(sae).param_groups[0]["r"] == 1.5
    with pytest.raises(ValueError, match="schedule_free_average_power"):
        jumpscope.build("topk", d_in=4, d_sae=8, k=2, schedule_free_average_power=-1)


def test_width_scaled_learning_rate_and_the_optimiser_the_config_names():
    sae = jumpscope.build("topk", d_in=8, d_sae=64, k=4, optimizer="signsgd_schedulefree", lr=5e-3,
                          lr_reference_width=16, lr_reference_steps=None, lr_reference_d_in=None)
    assert peak_lr(sae) == pytest.approx(5e-3 * math.sqrt(16 / 64))
    optimizer = make_optimizer(sae)
    assert isinstance(optimizer, ScheduleFreeSignSGD) and optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    assert isinstance(make_optimizer(jumpscope.build("batchtopk", d_in=8, d_sae=64, k=4)), torch.optim.Adam)
    with pytest.raises(ValueError, match="optimizer must be"):
        jumpscope.build("topk", d_in=8, d_sae=64, k=4, optimizer="sgd")
    with pytest.raises(ValueError, match="schedule_free_beta"):
        jumpscope.build("topk", d_in=8, d_sae=64, k=4, schedule_free_beta=1.0)


@pytest.mark.parametrize("steps,factor", [(500, 1.0), (2000, 0.5), (125, 2.0), (8000, 0.5), (10, 2.0), (None, 1.0)])
def test_run_length_scaled_learning_rate_goes_as_one_over_sqrt_steps_within_four_fold(steps, factor):
    # 1 / sqrt(T) within [500 / 4, 500 * 4] steps, flat outside; unknown length: lr as given
    sae = jumpscope.build("topk", d_in=8, d_sae=64, k=4, lr=7e-3, lr_reference_steps=500, lr_reference_d_in=None)
    assert peak_lr(sae, steps) == pytest.approx(7e-3 * factor)
    both = jumpscope.build("topk", d_in=8, d_sae=64, k=4, lr=7e-3, lr_reference_width=16, lr_reference_steps=500,
                           lr_reference_d_in=None)
    assert peak_lr(both, 2000) == pytest.approx(7e-3 * 0.5 * 0.5)
    every = jumpscope.build("topk", d_in=8, d_sae=64, k=4, lr=7e-3, lr_reference_width=16, lr_reference_steps=500,
                            lr_reference_d_in=2)
    assert peak_lr(every, 2000) == pytest.approx(7e-3 * 0.5 * 0.5 * 0.5)  # sqrt(2 / 8): half the step at 4x the input
    for field in ("lr_reference_steps", "lr_reference_d_in"):
        with pytest.raises(ValueError, match=field):
            jumpscope.build("topk", d_in=8, d_sae=64, k=4, **{field: 0})


@pytest.mark.parametrize("warmup,step,expected", [(10, 4, 0.5), (0.1, 4, 0.5), (0.05, 0, 0.2), (0, 0, 1.0)])
def test_warm_up_in_steps_or_as_a_fraction_of_the_run(warmup, step, expected):
    assert lr_factor(step, 100, warmup, 0.0) == pytest.approx(expected)  # 0.1 of 100 steps = 10 steps
    assert sparsity_factor(step, 100, warmup) == pytest.approx(expected)
    assert sparsity_factor(49, 100, -1) == pytest.approx(0.5)


def test_schedules_that_do_not_fit_the_run_warn():
    sae = jumpscope.build("topk", d_in=8, d_sae=64, k=4, optimizer="adam", lr_warmup_steps=100,
                          lr_decay_fraction=0.2)
    long = schedule_warnings("s", sae, 122)
    assert len(long) == 1 and "100 steps" in long[0] and "82%" in long[0]
    assert schedule_warnings("s", sae, 1000) == []
    overlap = jumpscope.build("topk", d_in=8, d_sae=64, k=4, lr_warmup_steps=50, lr_decay_fraction=0.6)
    assert "overlap" in schedule_warnings("s", overlap, 100)[0]
    fraction = jumpscope.build("topk", d_in=8, d_sae=64, k=4, lr_warmup_steps=0.05)
    assert schedule_warnings("s", fraction, 10) == []  # a fraction fits any run
    sparsity = jumpscope.build("relu", d_in=8, d_sae=64, sparsity_warmup_steps=500, lr_warmup_steps=0.05)
    assert "sparsity warm-up (500 steps)" in schedule_warnings("s", sparsity, 200)[0]


def test_the_trainer_warns_once_and_saves_the_average(caplog):
    torch.manual_seed(0)
    x = torch.randn(2048, 8)
    sae = jumpscope.build("topk", d_in=8, d_sae=32, k=4, optimizer="signsgd_schedulefree", lr=1e-2,
                          lr_warmup_steps=200, lr_decay_fraction=0.0, input_scaling="none")  # folding is identity
    trainer = jumpscope.Trainer({"s": sae}, jumpscope.TrainerConfig(total_tokens=2048, batch_size=256, progress=False,
                                                                    init_sample_tokens=256, device="cpu"))
    with caplog.at_level(logging.WARNING):
        trained = trainer.fit(x.split(256))["s"]
    assert sum("warm-up (200 steps)" in r.getMessage() for r in caplog.records) == 1
    optimizer = trainer.optimizers["s"]
    assert optimizer.averaged  # the SAE returned is the average x, not the training point y
    state = optimizer.state[trained.W_enc]
    beta = trained.cfg.schedule_free_beta
    optimizer.use_training_point()
    y = trained.W_enc.detach().clone()
    optimizer.use_average()
    assert torch.allclose(y, beta * trained.W_enc + (1 - beta) * state["z"], atol=1e-6)


class Crash(RuntimeError):
    pass


def _batches(n, crash_after=None):
    generator = torch.Generator().manual_seed(0)
    dictionary = torch.randn(24, 8, generator=generator)
    for index in range(n):
        if index == crash_after:
            raise Crash("simulated kill")
        codes = (torch.rand(96, 24, generator=generator) < 0.15) * torch.rand(96, 24, generator=generator)
        yield codes @ dictionary + 0.3


def test_a_schedule_free_run_resumes_to_identical_weights(tmp_path):
    def saes():
        fields = dict(d_in=8, d_sae=32, optimizer="signsgd_schedulefree", lr=1e-2, lr_warmup_steps=0.1,
                      lr_decay_fraction=0.0)
        return {"topk": jumpscope.build("topk", k=3, seed=1, **fields),
                "jump": jumpscope.build("jumprelu", target_l0=3, seed=2, **fields)}

    def config(folder):
        return jumpscope.TrainerConfig(total_tokens=128 * 40, batch_size=128, init_sample_tokens=256,
                                       checkpoint_every=7, progress=False, device="cpu", out_dir=str(folder))

    reference = jumpscope.Trainer(saes(), config(tmp_path / "ref")).fit(_batches(60))
    with pytest.raises(Crash):
        jumpscope.Trainer(saes(), config(tmp_path / "run")).fit(_batches(60, crash_after=31))
    resumed = jumpscope.Trainer(saes(), config(tmp_path / "run")).fit(_batches(60), resume=True)
    for name in reference:
        for key, value in reference[name].state_dict().items():
            assert torch.equal(value, resumed[name].state_dict()[key]), f"{name}.{key} differs"


def test_steered_parameters_take_rms_normalised_steps_without_averaging():
    p, q = torch.nn.Parameter(torch.tensor([1.0, 1.0])), torch.nn.Parameter(torch.tensor([0.0]))
    optimizer = ScheduleFreeSignSGD([{"params": [p]}, {"params": [q], "average": False,
                                                        "lr_factor": 2.0}], lr=0.1, beta=0.9)
    p.grad, q.grad = torch.tensor([1.0, 1.0]), torch.tensor([4.0])
    optimizer.step()  # first RMS step: v = 0.001 g^2, bias-corrected to g^2, so the step is 2 lr sign(g)
    assert q.item() == pytest.approx(-0.2)
    p.grad, q.grad = torch.tensor([1.0, 1.0]), torch.tensor([1.0])
    optimizer.step()
    v = (0.999 * 0.001 * 16 + 0.001 * 1) / (1 - 0.999 ** 2)
    assert q.item() == pytest.approx(-0.2 - 0.2 * 1 / math.sqrt(v), rel=1e-5)
    optimizer.use_average()  # the steered parameter is its latest value in both modes
    assert q.item() == pytest.approx(-0.2 - 0.2 / math.sqrt(v), rel=1e-5)
    sae = jumpscope.build("jumprelu", d_in=8, d_sae=32, target_l0=4)
    groups = make_optimizer(sae).param_groups
    assert [len(g["params"]) for g in groups] == [len(list(sae.parameters())) - 1, 1]
    assert groups[1]["params"][0] is sae.threshold_raw and groups[1]["lr_factor"] == 1.0  # RMS steps, unset factor


# sign: the size of the gradient plays no part (lr_factor 3 -> steps of 0.3).
# signum (lr_factor 2 -> steps of 0.2): m1 = 0.1 g1 = [0.4, -0.001, 0]: -> [-0.2, 1.2, 2.0] (no
# gradient yet: no step); m2 = 0.9 m1 + 0.1 g2 = [0.36, 0.0991, 0]: -> [-0.4, 1.0, 2.0];
# m3 = 0.9 m2 + 0.1 g3 = [0.324, 0.08919, -0.1]: a zero gradient still steps along the momentum.
@pytest.mark.parametrize("step, lr_factor, grads, expected", [
    ("sign", 3.0, ([4.0, -0.01, 0.0], [0.5, -2.0, 1.0]), [-0.6, 1.6, 1.7]),
    ("signum", 2.0, ([4.0, -0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]), [-0.6, 0.8, 2.2]),
])
def test_steered_parameters_may_take_sign_steps_instead(step, lr_factor, grads, expected):
    q = torch.nn.Parameter(torch.tensor([0.0, 1.0, 2.0]))
    optimizer = ScheduleFreeSignSGD([{"params": [q], "average": False, "lr_factor": lr_factor, "step": step}],
                                    lr=0.1, beta=0.9)
    for grad in grads:
        q.grad = torch.tensor(grad)
        optimizer.step()
    assert torch.allclose(q.detach(), torch.tensor(expected))
    sae = jumpscope.build("jumprelu", d_in=8, d_sae=32, target_l0=4, threshold_step=step)
    assert make_optimizer(sae).param_groups[1]["step"] == step


def test_jumprelu_thresholds_take_sign_steps_from_16_activations_per_latent_shrinking_with_small_batch_runs():
    sae = jumpscope.build("jumprelu", d_in=8, d_sae=32, target_l0=4)  # rows x 4 / 32 activations per latent
    assert sae.cfg.threshold_step == "auto" and sae.cfg.threshold_lr_factor is None
    groups = [make_optimizer(sae, rows, 500).param_groups[1] for rows in (None, 64, 127, 128, 1024, 4096)]
    assert [g["step"] for g in groups] == ["rms", "rms", "rms", "sign", "sign", "sign"]
    # sign steps under 4096 rows: sqrt(125 / steps), at most 1 (they travel as far as in 125 steps)
    assert [g["lr_factor"] for g in groups] == [1.0, 1.0, 1.0, 0.5, 0.5, 1.0]
    assert [make_optimizer(sae, 1024, steps).param_groups[1]["lr_factor"] for steps in (None, 50, 125, 2000)] \
        == [1.0, 1.0, 1.0, 0.25]
    assert make_optimizer(sae, 4096, 2000).param_groups[1]["lr_factor"] == 1.0
    wider = jumpscope.build("jumprelu", d_in=8, d_sae=4096, target_l0=4)  # 2048 rows: 2 per latent
    assert make_optimizer(wider, 2048, 2000).param_groups[1]["step"] == "rms"
    assert make_optimizer(wider, 2048, 2000).param_groups[1]["lr_factor"] == 1.0
    given = jumpscope.build("jumprelu", d_in=8, d_sae=32, target_l0=4, threshold_lr_factor=2.0)
    assert [make_optimizer(given, rows, 2000).param_groups[1]["lr_factor"] for rows in (64, 1024)] == [2.0, 2.0]
    trainer = jumpscope.Trainer(sae, jumpscope.TrainerConfig(total_tokens=1024 * 500, batch_size=1024, device="cpu",
                                                             progress=False))
    group = next(iter(trainer.optimizers.values())).param_groups[1]
    assert group["step"] == "sign" and group["lr_factor"] == 0.5


def test_averaged_weights_restores_the_training_point_bit_for_bit():
    from jumpscope.train.calibration import averaged_weights

    sae = jumpscope.build("jumprelu", d_in=6, d_sae=12, target_l0=2)
    optimizer = make_optimizer(sae)
    for _ in range(3):
        optimizer.zero_grad()
        sae.loss(torch.randn(64, 6), jumpscope.sae.StepContext()).loss.backward()
        optimizer.step()
    training_point = {k: v.clone() for k, v in sae.state_dict().items()}
    with averaged_weights(optimizer):
        assert not torch.equal(sae.W_enc, training_point["W_enc"])  # the average is in place
        with torch.no_grad():
            sae.threshold_raw.mul_(2.0)  # unaveraged: what the block writes stays
    for key, value in sae.state_dict().items():
        expected = training_point[key] * 2 if key == "threshold_raw" else training_point[key]
        assert torch.equal(value, expected), key
    assert not optimizer.averaged
