"""ReLU SAE: formulas, hand-computed loss, exact JumpReLU export, input-scale fold, validation."""

from __future__ import annotations

import pytest
import torch
from sae_checks import (assert_fold_takes_raw_inputs, loss_before_and_after, randomize, sample,  # noqa: F401
                        sparse_dictionary_data)

from jumpscope.sae import StepContext, build, get_class
from jumpscope.sae.jumprelu import JumpReLUSAE
from jumpscope.sae.relu import ReLUSAE, ReLUSAEConfig


def randomized(seed: int = 0, **fields) -> ReLUSAE:
    return randomize(ReLUSAE(ReLUSAEConfig(d_in=6, d_sae=20, **fields)), seed)


def test_registered_with_its_contract():
    assert get_class("relu") is ReLUSAE
    sae = build("relu", d_in=4, d_sae=8, l1_coefficient=0.3)
    assert isinstance(sae, ReLUSAE)
    assert set(sae.state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert sae.sparsity_coefficient() == 0.3
    assert sae.cfg.normalize_decoder is False


def test_decoder_init_norm_and_tied_encoder():
    sae = ReLUSAE(ReLUSAEConfig(d_in=5, d_sae=12, decoder_init_norm=0.1))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((12,), 0.1))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_encode_is_relu_of_affine_map(apply_b_dec):
    sae = randomized(apply_b_dec_to_input=apply_b_dec)
    x = sample()
    xin = x - sae.b_dec if apply_b_dec else x
    expected = torch.clamp(xin @ sae.W_enc + sae.b_enc, min=0)
    torch.testing.assert_close(sae.encode(x), expected)
    assert (expected == 0).any() and (expected > 0).any()


def test_loss_matches_hand_computation():
    sae = ReLUSAE(ReLUSAEConfig(d_in=2, d_sae=3, l1_coefficient=0.1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, 0.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]]))  # row norms 1, 1, 5
        sae.b_dec.copy_(torch.tensor([0.5, 0.0]))
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    # token 1: f = [1, 1, 0.5], x_hat = [3, 3], error^2 = 8, weighted L1 = 1 + 1 + 0.5 * 5 = 4.5
    # token 2: f = [2, 0, 0], x_hat = [2.5, 0], error^2 = 1.25, weighted L1 = 2
    out = sae.loss(x, StepContext(sparsity_scale=0.5))
    torch.testing.assert_close(out.feature_acts, torch.tensor([[1.0, 1.0, 0.5], [2.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.terms["mse"], torch.tensor(4.625))
    torch.testing.assert_close(out.terms["sparsity"], torch.tensor(0.5 * 0.1 * 3.25))
    torch.testing.assert_close(out.loss, torch.tensor(4.625 + 0.1625))


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_export_is_an_exactly_equivalent_jumprelu(apply_b_dec):
    sae = randomized(apply_b_dec_to_input=apply_b_dec)
    exported = sae.export()
    assert isinstance(exported, JumpReLUSAE)
    assert torch.equal(exported.threshold, torch.zeros(20))
    x = sample(256)
    f = sae.encode(x)
    assert (f > 0).float().mean() > 0.1 and (f == 0).float().mean() > 0.1
    torch.testing.assert_close(exported.encode(x), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported(x), sae(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_fold_scaling_takes_raw_inputs(apply_b_dec):
    assert_fold_takes_raw_inputs(randomized(apply_b_dec_to_input=apply_b_dec), 3.7, sample() * 3.7)


@pytest.mark.parametrize(("fields", "message"), [
    (dict(l1_coefficient=-1.0), "l1_coefficient"),
    (dict(decoder_init_norm=0.0), "decoder_init_norm"),
    (dict(apply_b_dec_to_input=True, d_out=3), "apply_b_dec_to_input"),
    (dict(d_sae=0), "d_sae"),
])
def test_bad_config_raises(fields, message):
    ReLUSAEConfig(d_in=4, d_sae=8)  # the baseline is valid
    with pytest.raises(ValueError, match=message):
        ReLUSAEConfig(**{"d_in": 4, "d_sae": 8, **fields})


def test_wrong_input_width_raises():
    sae = randomized()
    with pytest.raises(ValueError, match="d_in=6"):
        sae.encode(torch.zeros(3, 5))


def test_training_reduces_loss():
    x = sparse_dictionary_data()
    sae = ReLUSAE(ReLUSAEConfig(d_in=16, d_sae=64, l1_coefficient=0.01, decoder_init_norm=1.0))
    first, last = loss_before_and_after(sae, x)
    assert last < 0.2 * first
