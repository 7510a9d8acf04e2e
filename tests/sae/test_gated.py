"""Gated SAE: SAELens key names, hand-computed loss, stop-gradients, exact JumpReLU export."""

from __future__ import annotations

import math

import pytest
import torch
from sae_checks import (assert_fold_takes_raw_inputs, loss_before_and_after, randomize, sample,  # noqa: F401
                        sparse_dictionary_data)

from jumpscope.sae import StepContext, build, get_class
from jumpscope.sae.gated import GatedSAE, GatedSAEConfig
from jumpscope.sae.jumprelu import JumpReLUSAE


def randomized(seed: int = 0, **fields) -> GatedSAE:
    return randomize(GatedSAE(GatedSAEConfig(d_in=6, d_sae=40, **fields)), seed)


def gated_reference(sae: GatedSAE, x: torch.Tensor) -> torch.Tensor:
    """f from the paper's formulas, building W_mag explicitly."""
    W_mag = sae.W_enc * torch.exp(sae.r_mag)
    xc = x - sae.b_dec
    pi_gate = xc @ sae.W_enc + sae.b_gate
    pi_mag = xc @ W_mag + sae.b_mag
    return (pi_gate > 0).float() * torch.clamp(pi_mag, min=0)


def test_state_dict_has_exactly_the_saelens_gated_keys():
    assert get_class("gated") is GatedSAE
    sae = build("gated", d_in=4, d_sae=10)
    shapes = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    assert shapes == {"W_enc": (4, 10), "b_gate": (10,), "r_mag": (10,), "b_mag": (10,),
                      "W_dec": (10, 4), "b_dec": (4,)}
    assert sae.sparsity_coefficient() == sae.cfg.l1_coefficient
    assert sae.cfg.normalize_decoder is True


def test_encode_matches_the_paper_formula():
    sae = randomized()
    x = sample()
    f = sae.encode(x)
    torch.testing.assert_close(f, gated_reference(sae, x))
    assert (f > 0).any() and (f == 0).any()


def test_loss_matches_hand_computation():
    sae = GatedSAE(GatedSAEConfig(d_in=2, d_sae=2, l1_coefficient=0.2))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.r_mag.copy_(torch.tensor([0.0, math.log(2.0)]))
        sae.b_gate.copy_(torch.tensor([0.0, -1.0]))
        sae.b_mag.copy_(torch.tensor([1.0, 0.0]))
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
    # exp(r_mag) = [1, 2]
    x = torch.tensor([[2.0, 3.0], [0.0, 1.5]])
    # token 1: x - b_dec = [1, 3]; pi_gate = [1, 2]; pi_mag = [2, 6]; f = [2, 6]; x_hat = [3, 6]
    #   error^2 = 1 + 9 = 10; ReLU(pi_gate) = [1, 2], L1 = 3; frozen x_hat = [2, 2], error^2 = 1
    # token 2: x - b_dec = [-1, 1.5]; pi_gate = [-1, 0.5]; pi_mag = [0, 3]; f = [0, 3]; x_hat = [1, 3]
    #   error^2 = 1 + 2.25 = 3.25; ReLU(pi_gate) = [0, 0.5], L1 = 0.5; frozen x_hat = [1, 0.5], error^2 = 2
    out = sae.loss(x, StepContext(sparsity_scale=1.0))
    torch.testing.assert_close(out.feature_acts, torch.tensor([[2.0, 6.0], [0.0, 3.0]]))
    torch.testing.assert_close(out.terms["mse"], torch.tensor(6.625))
    torch.testing.assert_close(out.terms["sparsity"], torch.tensor(0.2 * 1.75))
    torch.testing.assert_close(out.terms["aux"], torch.tensor(1.5))
    torch.testing.assert_close(out.loss, torch.tensor(6.625 + 0.35 + 1.5))


def grads_of(term: str, **fields) -> dict[str, torch.Tensor | None]:
    sae = randomized(**fields)
    out = sae.loss(sample(), StepContext())
    out.terms[term].backward()
    return {name: p.grad for name, p in sae.named_parameters()}


def is_zero(grad: torch.Tensor | None) -> bool:
    return grad is None or bool((grad == 0).all())


def test_aux_term_gradient_stops_at_the_decoder():
    grads = grads_of("aux")
    assert is_zero(grads["W_dec"])
    assert not is_zero(grads["W_enc"]) and not is_zero(grads["b_gate"])
    assert is_zero(grads["r_mag"]) and is_zero(grads["b_mag"])  # the aux term trains the gate only
    # b_dec reaches the aux term only through the encoder input x - b_dec
    assert is_zero(grads_of("aux", apply_b_dec_to_input=False)["b_dec"])


def test_mse_does_not_train_the_gate_bias_and_l1_does_not_train_the_magnitudes():
    mse = grads_of("mse")
    assert is_zero(mse["b_gate"])
    assert not is_zero(mse["b_mag"]) and not is_zero(mse["r_mag"]) and not is_zero(mse["W_dec"])
    l1 = grads_of("sparsity")
    assert is_zero(l1["r_mag"]) and is_zero(l1["b_mag"]) and is_zero(l1["W_dec"])
    assert not is_zero(l1["b_gate"])


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_export_reproduces_gated_outputs_including_negative_thresholds(apply_b_dec):
    sae = randomized(apply_b_dec_to_input=apply_b_dec)
    raw_theta = sae.b_mag - torch.exp(sae.r_mag) * sae.b_gate
    assert (raw_theta < 0).any() and (raw_theta > 0).any()
    exported = sae.export()
    assert isinstance(exported, JumpReLUSAE)
    torch.testing.assert_close(exported.threshold, raw_theta.clamp(min=0))
    x = sample(512)
    f = sae.encode(x)
    torch.testing.assert_close(exported.encode(x), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported(x), sae(x), atol=1e-5, rtol=1e-5)
    # the clamp matters: with the raw (negative) thresholds some outputs would be negative
    pre = exported.pre_activation(x)
    assert ((pre > raw_theta) & (pre < 0)).any()


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_fold_scaling_takes_raw_inputs(apply_b_dec):
    sae = randomized(apply_b_dec_to_input=apply_b_dec)
    s = 0.3
    x_raw = sample() * s
    folded = assert_fold_takes_raw_inputs(sae, s, x_raw)
    torch.testing.assert_close(folded.r_mag, sae.r_mag)
    # and the exported form of the folded SAE takes raw inputs too
    torch.testing.assert_close(folded.export()(x_raw), s * sae(x_raw / s), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("fields", "message"), [
    (dict(l1_coefficient=-0.1), "l1_coefficient"),
    (dict(d_out=3), "apply_b_dec_to_input"),  # the default b_dec-on-input needs d_out == d_in
    (dict(input_scaling="bogus"), "input_scaling"),
])
def test_bad_config_raises(fields, message):
    GatedSAEConfig(d_in=4, d_sae=8)  # the baseline is valid
    with pytest.raises(ValueError, match=message):
        GatedSAEConfig(**{"d_in": 4, "d_sae": 8, **fields})


def test_transcoder_without_b_dec_on_input_is_allowed():
    sae = build("gated", d_in=4, d_sae=8, d_out=3, apply_b_dec_to_input=False)
    assert sae(torch.zeros(2, 4)).shape == (2, 3)


def test_wrong_input_width_raises():
    with pytest.raises(ValueError, match="d_in=6"):
        randomized().encode(torch.zeros(3, 7))


def test_training_reduces_loss():
    x = sparse_dictionary_data()
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=64, l1_coefficient=0.01))
    first, last = loss_before_and_after(sae, x)
    assert last < 0.2 * first


def test_initial_encoder_scale_is_the_least_squares_fit():
    torch.manual_seed(0)
    x = torch.randn(2048, 16) * 3.0 + 1.0
    plain = build("gated", d_in=16, d_sae=128, seed=1, fit_encoder_scale=False)
    fitted = build("gated", d_in=16, d_sae=128, seed=1)
    plain.init_from_data(x)
    fitted.init_from_data(x)

    def error(sae):
        return (x - sae.decode(sae.encode(x))).pow(2).sum().item()

    # 8x width with the transposed-decoder init: the plain reconstruction is several times too large
    assert error(plain) > 3 * (x - plain.b_dec).pow(2).sum().item()
    assert torch.equal(fitted.encode(x) > 0, plain.encode(x) > 0)  # the same gates stay open
    for scale in (0.8, 1.25):  # the fitted scale is the minimum along the ray
        probe = build("gated", d_in=16, d_sae=128, seed=1)
        probe.load_state_dict(fitted.state_dict())
        with torch.no_grad():
            probe.W_enc.mul_(scale)
        assert error(probe) > error(fitted)
    assert error(fitted) < (x - fitted.b_dec).pow(2).sum().item()
