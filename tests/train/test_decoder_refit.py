"""The decoder refit: the ridge least-squares decoder given the codes, built from sparse codes."""

import importlib

import pytest
import torch

from jumpscope.sae import build
from jumpscope.train import Trainer, TrainerConfig
from jumpscope.train.decoder_refit import gram_update, refit_decoder

D_IN, WIDTH = 6, 24


def dictionary_rows(n, seed=0):
    """Rows made of a few of 24 random directions, with an offset (so b_dec matters)."""
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(WIDTH, D_IN, generator=generator)
    codes = (torch.rand(n, WIDTH, generator=generator) < 0.15) * torch.rand(n, WIDTH, generator=generator)
    return codes @ atoms + 0.2


def test_the_sparse_gram_is_the_dense_product():
    generator = torch.Generator().manual_seed(3)
    codes = torch.relu(torch.randn(200, 40, generator=generator) - 1.2)
    target = torch.randn(200, 5, generator=generator)
    gram, cross = torch.zeros(40, 40, dtype=torch.float64), torch.zeros(40, 5, dtype=torch.float64)
    gram_update(gram, cross, codes, target)
    gram_update(gram, cross, codes[:17], target[:17])  # sums over calls
    dense = codes.double().T @ codes.double() + codes[:17].double().T @ codes[:17].double()
    assert torch.allclose(gram.double(), dense, rtol=1e-5, atol=1e-5)
    expected = codes.double().T @ target.double() + codes[:17].double().T @ target[:17].double()
    assert torch.allclose(cross, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch, fields", [("topk", {"k": 3}), ("jumprelu", {"target_l0": 3}),
                                          ("relu", {}), ("topk", {"k": 3, "d_out": 4, "skip_connection": True,
                                                     "apply_b_dec_to_input": False})])
def test_the_refit_decoder_zeroes_the_ridge_objectives_gradient(arch, fields):
    """At the minimum of |Y - F W|^2 + s |W - W0|^2 the gradient F^T (F W - Y) + s (W - W0)
    vanishes; checked densely in float64, with Y = target - b_dec - skip."""
    sae = build(arch, d_in=D_IN, d_sae=WIDTH, seed=0, **fields)
    x = dictionary_rows(512)
    target = x[:, :4] * 2 - 1 if "d_out" in fields else x
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # ReLU: some latents active on every row
        codes = sae.encode(x).double()
        fit = (sae.split_skip(x, target)[0] - sae.b_dec).double()
        variance = (target - target.mean(0)).pow(2).sum()
        before = (target - sae(x)).pow(2).sum() / variance
    old = sae.W_dec.detach().double().clone()
    note = refit_decoder(sae, [(x[:300], target[:300]), (x[300:], target[300:])], ridge=0.05)
    new = sae.W_dec.detach().double()
    shrink = 0.05 * (codes * codes).sum(0).mean()
    gradient = codes.T @ (codes @ new - fit) + shrink * (new - old)
    assert gradient.abs().max() < 1e-4 * (codes.T @ fit).abs().max()
    assert not torch.allclose(new, old, atol=1e-3)
    with torch.no_grad():  # the note's FVUs are those of the forward before and after
        after = (target - sae(x)).pow(2).sum() / variance
    assert note["refit_fvu_before"] == pytest.approx(float(before), rel=1e-5)
    assert note["refit_fvu_after"] == pytest.approx(float(after), rel=1e-4)
    assert note["refit_fvu_after"] < note["refit_fvu_before"]
    assert note["refit_rows"] == 512


def test_dead_latents_keep_their_rows_and_the_codes_do_not_move():
    sae = build("topk", d_in=D_IN, d_sae=WIDTH, k=2, seed=1)
    x = dictionary_rows(400, seed=1)
    with torch.no_grad():
        sae.W_enc[:, :5] = 0
        sae.b_enc[:5] = -1.0  # latents 0-4 never fire
        before_codes = sae.encode(x)
    old = sae.W_dec.detach().clone()
    refit_decoder(sae, [(x, x)])
    assert torch.allclose(sae.W_dec[:5], old[:5], atol=1e-6)
    assert not torch.allclose(sae.W_dec[5:], old[5:], atol=1e-3)
    assert torch.equal(sae.encode(x), before_codes)


def test_a_jacobian_pair_keeps_its_decoder():
    """Its W_dec reconstructs the MLP's input and carries the Jacobian penalty: no refit onto the target."""
    pair = build("jsae", d_in=D_IN, d_sae=WIDTH, k=2, seed=0)
    old = pair.W_dec.detach().clone()
    assert refit_decoder(pair, [(dictionary_rows(200), dictionary_rows(200, seed=5))]) == {}
    assert torch.equal(pair.W_dec, old)


def test_nothing_changes_without_rows_or_above_the_width_limit(monkeypatch, caplog):
    sae = build("topk", d_in=D_IN, d_sae=WIDTH, k=2, seed=1)
    old = sae.W_dec.detach().clone()
    assert refit_decoder(sae, []) == {}
    monkeypatch.setattr(importlib.import_module("jumpscope.train.decoder_refit"), "MAX_WIDTH", WIDTH - 1)
    assert refit_decoder(sae, [(dictionary_rows(100), dictionary_rows(100))], name="SAE 'wide'") == {}
    assert torch.equal(sae.W_dec, old)
    assert "SAE 'wide': decoder refit skipped at width 24" in caplog.text


def test_the_refit_is_skipped_with_a_warning_where_its_system_does_not_fit_in_free_memory(monkeypatch, caplog):
    module = importlib.import_module("jumpscope.train.decoder_refit")
    need = module.refit_memory(WIDTH, D_IN)
    assert need >= 8 * WIDTH * WIDTH  # at least the float64 Gram
    sae = build("topk", d_in=D_IN, d_sae=WIDTH, k=2, seed=1)
    old = sae.W_dec.detach().clone()
    rows = dictionary_rows(100)
    monkeypatch.setattr(module, "available_memory", lambda device: need - 1)
    assert refit_decoder(sae, [(rows, rows)], name="SAE 'a'") == {}
    assert torch.equal(sae.W_dec, old)
    assert "SAE 'a': decoder refit skipped" in caplog.text and "GiB are free on cpu" in caplog.text
    monkeypatch.setattr(module, "available_memory", lambda device: need)
    assert refit_decoder(sae, [(rows, rows)])["refit_fvu_after"] < 1
    assert not torch.equal(sae.W_dec, old)


def held_out_fvu(sae, x):
    with torch.no_grad():
        return float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize("arch, fields", [("topk", {"k": 4}), ("jumprelu", {"target_l0": 4})])
def test_a_short_run_reconstructs_held_out_rows_better_after_its_refit(arch, fields):
    """Twelve steps leave the decoder behind its encoder: the refit on the run's rows lowers the
    FVU on rows it never saw, at the same L0; JumpReLU's rows are unit again (rescaled exactly)."""
    batches = [dictionary_rows(256, seed=10 + i) for i in range(12)]
    held_out = dictionary_rows(2048, seed=99)
    runs = {}
    for tokens in (0, 4096):
        sae = build(arch, d_in=D_IN, d_sae=WIDTH, seed=0, **fields)
        cfg = TrainerConfig(total_tokens=256 * 12, batch_size=256, init_sample_tokens=256, progress=False,
                            device="cpu", decoder_refit_tokens=tokens)
        trainer = Trainer({"sae": sae}, cfg)
        runs[tokens] = (trainer.fit(iter(batches))["sae"], trainer.final_summary()["sae"])
    (plain, plain_summary), (refit, summary) = runs[0], runs[4096]
    assert "calibration_refit_fvu_after" not in plain_summary
    assert summary["calibration_refit_rows"] == 256 * 12
    assert held_out_fvu(refit, held_out) < 0.95 * held_out_fvu(plain, held_out)
    with torch.no_grad():
        assert torch.equal((refit.encode(held_out) > 0).sum(), (plain.encode(held_out) > 0).sum()) or arch == "jumprelu"
    if arch == "jumprelu":
        assert torch.allclose(refit.W_dec.norm(dim=1), torch.ones(WIDTH), atol=1e-5)


def test_the_refit_of_a_run_on_activations_fifty_times_larger_is_the_same_sae_scaled():
    """The refit works in the SAE's scaled units: raw activations 50x larger give the same decoder
    and a 50x larger b_dec."""
    trained = []
    for scale in (1.0, 50.0):
        sae = build("topk", d_in=D_IN, d_sae=WIDTH, k=4, seed=0)
        cfg = TrainerConfig(total_tokens=256 * 12, batch_size=256, init_sample_tokens=256, progress=False,
                            device="cpu", decoder_refit_tokens=4096)
        trainer = Trainer({"sae": sae}, cfg)
        trained.append(trainer.fit(iter([scale * dictionary_rows(256, seed=10 + i) for i in range(12)]))["sae"])
        assert "calibration_refit_fvu_after" in trainer.final_summary()["sae"]
    small, large = trained
    assert torch.allclose(small.W_dec, large.W_dec, atol=1e-4)
    assert torch.allclose(50 * small.b_dec, large.b_dec, atol=5e-3)


@pytest.mark.cuda
def test_the_refit_on_a_gpu_gives_the_cpus_decoder():
    """The CUDA path (dense float64 Gram on the device, factored in place) against the CPU's sparse one."""
    x = dictionary_rows(2048, seed=4)
    cpu = build("topk", d_in=D_IN, d_sae=WIDTH, k=3, seed=2)
    gpu = build("topk", d_in=D_IN, d_sae=WIDTH, k=3, seed=2).to("cuda")
    on_cpu = refit_decoder(cpu, [(chunk, chunk) for chunk in x.split(500)])
    on_gpu = refit_decoder(gpu, [(chunk.cuda(), chunk.cuda()) for chunk in x.split(500)])
    assert on_gpu["refit_fvu_after"] == pytest.approx(on_cpu["refit_fvu_after"], rel=1e-4)
    assert torch.allclose(gpu.W_dec.cpu(), cpu.W_dec, rtol=1e-4, atol=1e-5)


def test_too_few_rows_per_latent_are_named(caplog):
    sae = build("topk", d_in=D_IN, d_sae=WIDTH, k=3, seed=0)
    few = dictionary_rows(WIDTH * 4)
    assert refit_decoder(sae, [(few, few)], name="SAE 'x'")
    assert "SAE 'x': decoder refit on 96 rows for 24 latents (4.0 per latent)" in caplog.text
    caplog.clear()
    enough = dictionary_rows(WIDTH * 16)
    refit_decoder(sae, [(enough, enough)])
    assert "per latent" not in caplog.text
