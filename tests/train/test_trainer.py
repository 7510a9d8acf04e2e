"""The trainer: resumes exactly, folds the input scale, trains SAEs independently, fails clearly."""

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from jumpscope.sae import build
from jumpscope.train import Trainer, TrainerConfig
from jumpscope.train.batches import rebatch
from jumpscope.train.optim import lr_factor, sparsity_factor
from recipes import adam_build

D_IN = 8


def stream(n_batches, rows=96, seed=0, scale=1.0):
    """A replayable, deterministic stream of sparse-ish activations with a mean offset."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(24, D_IN, generator=generator)
    for _ in range(n_batches):
        codes = (torch.rand(rows, 24, generator=generator) < 0.15) * torch.rand(rows, 24, generator=generator)
        yield scale * (codes @ dictionary + 0.3)


def small_saes():
    return {"jump": adam_build("jumprelu", d_in=D_IN, d_sae=32, target_l0=3, seed=1),
            "jump_log": adam_build("jumprelu", d_in=D_IN, d_sae=32, l0_coefficient=0.05, log_threshold=True,
                              threshold_init_l0=4, seed=2)}


def config(tmp_path=None, **fields):
    values = dict(total_tokens=128 * 40, batch_size=128, init_sample_tokens=256, log_every=5,
                  checkpoint_every=7, progress=False, device="cpu")
    if tmp_path is not None:
        values["out_dir"] = str(tmp_path)
    return TrainerConfig(**{**values, **fields})


def assert_same_weights(saes_a, saes_b):
    assert saes_a.keys() == saes_b.keys()
    for name in saes_a:
        state_a, state_b = saes_a[name].state_dict(), saes_b[name].state_dict()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"{name}.{key} differs"


class Crash(RuntimeError):
    pass


def crashing(batches, after):
    for index, batch in enumerate(batches):
        if index == after:
            raise Crash("simulated kill")
        yield batch


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    reference = Trainer(small_saes(), config(tmp_path / "ref")).fit(stream(60))
    with pytest.raises(Crash):
        Trainer(small_saes(), config(tmp_path / "run")).fit(crashing(stream(60), after=31))
    checkpoint = tmp_path / "run" / "checkpoint.safetensors"
    assert checkpoint.exists()
    resumed = Trainer(small_saes(), config(tmp_path / "run")).fit(stream(60), resume=True)
    assert_same_weights(reference, resumed)
    # The log has each (step, sae) once, in order, even though steps after the checkpoint ran twice.
    lines = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    keys = [(line["step"], line["sae"]) for line in lines]
    assert len(keys) == len(set(keys)) and [k[0] for k in keys] == sorted(k[0] for k in keys)
    assert {line["step"] for line in lines} == set(range(5, 41, 5)) | {40}


def test_killed_process_resumes_to_identical_weights(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        sys.path.insert(0, {os.path.join(os.path.dirname(os.path.dirname(__file__)), "helpers")!r})
        from test_trainer import small_saes, stream, config
        from jumpscope.train import Trainer
        def slow(batches):
            for batch in batches:
                time.sleep(0.05)
                yield batch
        Trainer(small_saes(), config({str(tmp_path / 'run')!r}, checkpoint_every=3)).fit(slow(stream(60)))
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    checkpoint = tmp_path / "run" / "checkpoint.safetensors"
    deadline = time.time() + 60
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert checkpoint.exists()
    resumed = Trainer(small_saes(), config(tmp_path / "run")).fit(stream(60), resume=True)
    reference = Trainer(small_saes(), config()).fit(stream(60))
    assert_same_weights(reference, resumed)


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path):
    Trainer(small_saes(), config(tmp_path)).fit(stream(60))
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(small_saes(), config(tmp_path)).fit(stream(60))
    other = {"jump": adam_build("jumprelu", d_in=D_IN, d_sae=64, target_l0=3)}
    with pytest.raises(ValueError, match="different SAEs or configs"):
        Trainer(other, config(tmp_path)).fit(stream(60), resume=True)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    Trainer(small_saes(), config(tmp_path)).fit(stream(60))
    checkpoint = tmp_path / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt"):
        Trainer(small_saes(), config(tmp_path)).fit(stream(60), resume=True)


def test_input_scale_is_folded_so_saved_sae_takes_raw_activations():
    # Training on 50x larger activations must give the same SAE with biases/thresholds 50x larger.
    # without the decoder refit, whose least squares amplify jump_log's 1e-4 drift between the two
    # runs twentyfold (its own scale handling: tests/train/test_decoder_refit.py)
    small = Trainer(small_saes(), config(decoder_refit_tokens=0)).fit(stream(60))
    large = Trainer(small_saes(), config(decoder_refit_tokens=0)).fit(stream(60, scale=50.0))
    for name in small:
        a, b = small[name], large[name]
        assert torch.allclose(a.W_enc, b.W_enc, atol=2e-4) and torch.allclose(a.W_dec, b.W_dec, atol=2e-4)
        assert torch.allclose(50 * a.b_dec, b.b_dec, rtol=1e-3, atol=2e-3)
        assert torch.allclose(50 * a.threshold, b.threshold, rtol=1e-3, atol=2e-3)
        x = next(iter(stream(1, seed=5)))
        # in raw units: the 50x model's outputs, scaled back (an absolute tolerance must not grow 50x)
        assert torch.allclose(a(x), b(50 * x) / 50, rtol=1e-3, atol=5e-3)


def test_saes_trained_together_equal_saes_trained_alone():
    together = Trainer(small_saes(), config()).fit(stream(60))
    for name in together:
        alone = Trainer({name: small_saes()[name]}, config()).fit(stream(60))
        assert_same_weights({name: together[name]}, alone)


def test_training_reaches_target_l0_with_unit_norm_decoder():
    # bandwidth 0.02: with d_in=8 and 128-row batches, eps=0.001 leaves ~0.1 kernel hits per batch.
    trainer = Trainer({"jump": adam_build("jumprelu", d_in=D_IN, d_sae=32, target_l0=3, bandwidth=0.02)},
                      config(total_tokens=128 * 500))
    saes = trainer.fit(stream(700))
    summary = trainer.final_summary()["jump"]
    assert abs(summary["l0"] - 3) < 0.3
    assert summary["fvu"] < 0.4
    assert torch.allclose(saes["jump"].W_dec.norm(dim=1), torch.ones(32), atol=1e-5)


def test_decoder_gradient_projection_removes_parallel_component():
    sae = adam_build("jumprelu", d_in=D_IN, d_sae=16)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_decoder_grad()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(16), atol=1e-6)


def test_bad_inputs_are_clear_errors():
    def with_nan():
        batch = next(iter(stream(1, rows=200)))
        batch[3, 2] = float("nan")
        yield batch
    with pytest.raises(ValueError, match="non-finite activations"):
        Trainer(small_saes(), config()).fit(with_nan())
    with pytest.raises(ValueError, match="'input' has width 5, the SAE reading it expects 8"):
        Trainer(small_saes(), config()).fit([torch.randn(128, 5)])
    with pytest.raises(ValueError, match="no activation batches"):
        Trainer(small_saes(), config()).fit([])
    with pytest.raises(ValueError, match="disagree on its width: 4 vs 5"):
        Trainer([adam_build("jumprelu", d_in=4, d_sae=8), adam_build("jumprelu", d_in=5, d_sae=8)], config()).fit(
            [torch.randn(128, 4)])
    with pytest.raises(ValueError, match="no cfg.site"):
        Trainer(small_saes(), config()).fit([{"layers.0.resid_post": torch.randn(128, D_IN)}])
    with pytest.raises(ValueError, match="smaller than one batch"):
        TrainerConfig(total_tokens=10, batch_size=128)


def test_rebatch_is_independent_of_incoming_chunking():
    data = torch.randn(1000, 3)
    chunks = [data[:7], data[7:300], data[300:301], data[301:]]
    batches = [b["input"] for b in rebatch(chunks, 64, {"input": 3}, start_row=100)]
    assert len(batches) == (1000 - 100) // 64
    assert torch.equal(torch.cat(batches), data[100:100 + 64 * len(batches)])


def test_schedules():
    assert lr_factor(0, 100, 10, 0.2) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.2) == 1.0 and lr_factor(79, 100, 10, 0.2) == 1.0
    assert lr_factor(90, 100, 10, 0.2) == pytest.approx(0.5)
    assert sparsity_factor(4, 100, 10) == pytest.approx(0.5) and sparsity_factor(50, 100, 10) == 1.0
    assert sparsity_factor(49, 100, -1) == pytest.approx(0.5)


def test_diverging_loss_is_reported_before_a_checkpoint_is_written(tmp_path):
    saes = {"jump": adam_build("jumprelu", d_in=D_IN, d_sae=32, target_l0=3, lr=1e30)}
    with pytest.raises(FloatingPointError, match="'jump': the loss became NaN or inf"):
        Trainer(saes, config(tmp_path, checkpoint_every=1)).fit(stream(60))
    checkpoint = tmp_path / "checkpoint.safetensors"
    if checkpoint.exists():  # whatever was written before the failure holds only finite values
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint)).values())


def test_bf16_autocast_falls_back_to_float32_on_cpu():
    plain = Trainer(small_saes(), config()).fit(stream(60))
    autocast = Trainer(small_saes(), config(autocast="bf16")).fit(stream(60))
    assert_same_weights(plain, autocast)


def test_dict_batches_route_each_sae_to_its_site():
    # Two sites of different widths from "one model pass": each SAE reads its own site, and the
    # result equals training it alone on that site's tensors.
    def sites(n_batches):
        for a, b in zip(stream(n_batches, seed=1), stream(n_batches, seed=2)):
            yield {"layers.0.resid_post": a, "layers.1.mlp_out": torch.cat([b, b[:, :4]], dim=1)}

    saes = {"first": adam_build("jumprelu", d_in=D_IN, d_sae=32, target_l0=3, site="layers.0.resid_post"),
            "second": adam_build("jumprelu", d_in=D_IN + 4, d_sae=32, target_l0=3, site="layers.1.mlp_out")}
    together = Trainer(saes, config()).fit(sites(60))
    alone = Trainer({"second": adam_build("jumprelu", d_in=D_IN + 4, d_sae=32, target_l0=3)}, config()).fit(
        torch.cat([b, b[:, :4]], dim=1) for b in stream(60, seed=2))
    assert_same_weights({"second": together["second"]}, alone)
    explicit = Trainer({"x": adam_build("jumprelu", d_in=D_IN, d_sae=32, target_l0=3)}, config(),
                       inputs={"x": "layers.0.resid_post"}).fit(sites(60))
    assert_same_weights({"x": together["first"]}, explicit)


def test_transcoder_pairs_fold_input_and_output_scales_separately():
    mixing = torch.randn(D_IN, 5, generator=torch.Generator().manual_seed(3))

    def pairs(output_scale):
        for x in stream(60):
            yield x, output_scale * torch.tanh(x @ mixing)

    def transcoder():
        return {"tc": adam_build("jumprelu", d_in=D_IN, d_out=5, d_sae=32, target_l0=3, b_dec_init="zeros")}

    plain = Trainer(transcoder(), config()).fit(pairs(1.0))["tc"]
    scaled = Trainer(transcoder(), config()).fit(pairs(20.0))["tc"]
    x = next(iter(stream(1, seed=9)))
    assert plain(x).shape == (96, 5)
    assert torch.allclose(plain.encode(x), scaled.encode(x), rtol=1e-3, atol=1e-3)  # inputs unchanged
    assert torch.allclose(20 * plain(x), scaled(x), rtol=1e-3, atol=2e-3)
    with pytest.raises(ValueError, match="needs a target entry"):
        Trainer(transcoder(), config(), inputs={"tc": "a"}).fit([{"a": torch.randn(128, D_IN)}])


def test_resuming_a_finished_run_reads_no_data(tmp_path):
    first = Trainer(small_saes(), config(tmp_path)).fit(stream(60))

    def must_not_be_read():
        raise AssertionError("a finished run replayed its data")
        yield

    again = Trainer(small_saes(), config(tmp_path)).fit(itertools.chain([next(iter(stream(1)))], must_not_be_read()),
                                                         resume=True)
    assert_same_weights(first, again)


def test_resume_may_change_runtime_fields_such_as_the_kernel(tmp_path):
    def saes(kernel):
        return {"jump": adam_build("jumprelu", d_in=D_IN, d_sae=32, target_l0=3, kernel=kernel)}

    with pytest.raises(Crash):
        Trainer(saes("dense"), config(tmp_path)).fit(crashing(stream(60), after=20))
    resumed = Trainer(saes("sparse"), config(tmp_path)).fit(stream(60), resume=True)
    reference = Trainer(saes("dense"), config()).fit(stream(60))
    for key, value in reference["jump"].state_dict().items():
        assert torch.allclose(value, resumed["jump"].state_dict()[key], atol=1e-4), key


def test_transcoders_with_mean_b_dec_init_keep_a_zero_output_bias_at_init():
    sae = adam_build("jumprelu", d_in=D_IN, d_out=5, d_sae=16, target_l0=3)  # b_dec_init="mean" by default
    sae.init_from_data(torch.randn(200, D_IN))
    assert torch.equal(sae.b_dec, torch.zeros(5))
    with pytest.raises(ValueError, match="apply_b_dec_to_input is for SAEs.*set it to False for a transcoder"):
        adam_build("topk", d_in=D_IN, d_out=5, d_sae=16, k=2)


def test_jumprelu_with_target_l0_ends_at_it_on_training_rows_spread_over_the_run():
    # Sign descent's averaged weights: the saved SAE differs from the point the controller steered
    # (thresholds at half speed, so that the controller lags and the calibration has work to do).
    batches = list(stream(40, rows=128))
    trainer = Trainer({"jump": build("jumprelu", d_in=D_IN, d_sae=32, target_l0=3, threshold_lr_factor=0.5)},
                      config(total_tokens=128 * 40, calibration_tokens=1000))
    sae = trainer.fit(batches)["jump"]
    # step s keeps rows floor(1000 s / 40) .. floor(1000 (s + 1) / 40): 25 from the start of every batch
    sample = torch.cat([batch[:25] for batch in batches])
    l0 = (sae.encode(sample) > 0).sum(-1).double().mean().item()  # raw rows: the scale is folded in
    assert 3 - 0.02 <= l0 <= 3
    summary = trainer.final_summary()["jump"]
    assert summary["calibration_l0_after"] == pytest.approx(l0, abs=1e-6)
    # there was something to do, and the calibration did it (the gap before is machine-dependent:
    # 0.017 on one CPU, above 0.02 on another, so no fixed margin)
    assert abs(summary["calibration_l0_before"] - 3) > abs(summary["calibration_l0_after"] - 3)


def test_resumed_run_calibrates_on_the_sample_its_checkpoint_kept(tmp_path):
    def saes():
        return {"jump": adam_build("jumprelu", d_in=D_IN, d_sae=32, target_l0=3, seed=1)}

    settings = dict(checkpoint_every=30, calibration_tokens=40 * 10)
    reference = Trainer(saes(), config(**settings)).fit(stream(40, rows=128))
    with pytest.raises(Crash):  # one 128-row item per step: the crash comes at step 35
        Trainer(saes(), config(tmp_path, **settings)).fit(crashing(stream(40, rows=128), after=35))
    saved = load_file(tmp_path / "checkpoint.safetensors")["trainer.calibration.input"]
    assert saved.shape == (300, D_IN)  # 10 rows from each of the 30 steps before the checkpoint
    resumed = Trainer(saes(), config(tmp_path, **settings)).fit(stream(40, rows=128), resume=True)
    assert_same_weights(reference, resumed)


def test_a_reference_run_length_scales_the_step_size_by_the_run_s_length(tmp_path):
    # 40 steps against a 10-step reference: lr / sqrt(4) (train/optim.py peak_lr)
    sae = build("topk", d_in=D_IN, d_sae=32, k=3, seed=0, lr=1e-2, lr_reference_steps=10,
                lr_reference_d_in=None)
    trainer = Trainer({"topk": sae}, config(tmp_path, checkpoint_every=0))
    trainer.fit(stream(80))
    assert trainer.step == 40
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    lrs = [row["lr"] for row in rows if row.get("sae") == "topk"]
    assert len(lrs) == 8 and lrs == pytest.approx([5e-3] * 8)


def test_the_trainer_tells_losses_how_far_the_run_has_gone(tmp_path):
    # JumpReLU's pre-activation penalty falls to 0 at half the run: steps 0-19 of 40 carry it
    sae = build("jumprelu", d_in=D_IN, d_sae=32, target_l0=3, seed=0, pre_act_coefficient=1e-2,
                pre_act_decay_fraction=0.5)
    Trainer({"jump": sae}, config(tmp_path, checkpoint_every=0, log_every=1)).fit(stream(80))
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row.get("sae") == "jump"]
    assert len(rows) == 40
    with_term = [row["step"] for row in rows if "pre_act" in row]
    assert with_term == list(range(1, 21))  # logged steps count from 1


@pytest.mark.parametrize("autocast, native_bf16, expected", [("bf16", True, True), ("bf16", False, False),
                                                             ("none", True, False)])
def test_autocast_bf16_on_cpu_asks_the_losses_for_bf16_selection_where_native(monkeypatch, autocast, native_bf16,
                                                                              expected):
    from jumpscope.sae import mixed
    monkeypatch.setattr(mixed, "fast_bf16_matmul", lambda: native_bf16)
    sae = build("topk", d_in=16, d_sae=64, k=4, kernel="sparse")
    seen = []
    loss = sae.loss
    monkeypatch.setattr(sae, "loss", lambda x, ctx, target=None: seen.append(ctx.bf16_selection) or loss(x, ctx, target))
    data = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    Trainer(sae, TrainerConfig(total_tokens=256, batch_size=64, device="cpu", progress=False, autocast=autocast,
                               init_sample_tokens=64, checkpoint_every=0)).fit([data])
    assert seen and set(seen) == {expected}
