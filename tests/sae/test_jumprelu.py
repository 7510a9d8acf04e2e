"""JumpReLU SAE: the straight-through estimators of SPEC 1, the loss modes, the fold, presets."""

import pytest
import torch

from jumpscope.sae import StepContext, build
from jumpscope.sae.jumprelu import JumpReLUConfig, jumprelu, jumprelu_from_weights, step


def make(**fields):
    fields = {"d_in": 6, "d_sae": 10, **fields}
    return build("jumprelu", **fields)


def test_forward_is_strict_step_times_input():
    z = torch.tensor([[0.5, 1.0, 1.5, -2.0]])
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert torch.equal(jumprelu(z, theta, 0.1), torch.tensor([[0.0, 0.0, 1.5, -0.0]]))
    assert torch.equal(step(z, theta, 0.1), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


def test_jumprelu_pseudo_derivatives_match_spec():
    eps = 0.1
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    # Column 0: 1.02 is inside the kernel window (|z - theta| < eps/2), 1.2 above it, 0.97 inside below.
    z = torch.tensor([[1.02, 2.5], [1.2, 1.0], [0.97, 2.04]], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    (jumprelu(z, theta, eps) * upstream).sum().backward()
    # dJumpReLU/dz = H(z - theta): no straight-through term.
    assert torch.equal(z.grad, upstream * (z > theta).float())
    # dJumpReLU/dtheta = -(theta/eps) K((z - theta)/eps), summed over the batch.
    expected = torch.tensor([-(1.0 / eps) * (1.0 + 5.0), -(2.0 / eps) * 6.0])
    assert torch.allclose(theta.grad, expected)


def test_step_gradient_reaches_only_threshold():
    eps = 0.1
    theta = torch.tensor([1.0], requires_grad=True)
    z = torch.tensor([[0.98], [1.03], [1.5]], requires_grad=True)
    step(z, theta, eps).sum().backward()
    assert z.grad is None or torch.count_nonzero(z.grad) == 0
    assert torch.allclose(theta.grad, torch.tensor([-2.0 / eps]))


def test_l0_term_uses_pre_activation_so_latents_just_below_threshold_get_gradient():
    sae = make(d_in=1, d_sae=1, bandwidth=0.1, l0_coefficient=1.0, b_dec_init="zeros")
    with torch.no_grad():
        sae.W_enc.fill_(1.0)
        sae.threshold_raw.fill_(1.0)
    x = torch.tensor([[0.97]])  # pre-activation 0.97 < theta: the latent is off
    out = sae.loss(x, StepContext())
    assert out.feature_acts.item() == 0.0
    out.terms["sparsity"].backward()
    # A step on the post-JumpReLU output would give exactly zero here.
    assert sae.threshold_raw.grad.item() == pytest.approx(-1.0 / 0.1)


def test_l0_term_does_not_train_encoder():
    sae = make(l0_coefficient=1.0, threshold_init_l0=3, bandwidth=0.5)
    x = torch.randn(64, 6)
    sae.init_from_data(x)
    sae.loss(x, StepContext()).terms["sparsity"].backward()
    assert sae.W_enc.grad is None or torch.count_nonzero(sae.W_enc.grad) == 0
    assert torch.count_nonzero(sae.threshold_raw.grad) > 0


def test_target_l0_pushes_thresholds_toward_target():
    x = torch.randn(256, 6)
    # sign of dLoss/dtheta: negative when L0 is above the target (descent raises thresholds).
    for init_l0, target, sign in ((8, 2, -1), (2, 8, 1)):
        sae = make(target_l0=target, threshold_init_l0=init_l0, bandwidth=0.5)
        sae.init_from_data(x)
        sae.loss(x, StepContext()).terms["sparsity"].backward()
        grad = sae.threshold_raw.grad
        assert (sign * grad >= 0).all() and (sign * grad > 0).any()


def test_threshold_quantile_init_reaches_requested_l0_on_the_sample():
    x = torch.randn(4000, 6)
    sae = make(d_sae=40, target_l0=5)
    sae.init_from_data(x)
    l0 = (sae.encode(x) > 0).sum(-1).float().mean().item()
    assert abs(l0 - 5) < 0.1


def test_tanh_variant_matches_hand_formula():
    sae = make(sparsity_loss="tanh", l0_coefficient=0.3, tanh_scale=4.0, pre_act_coefficient=0.2)
    x = torch.randn(32, 6)
    out = sae.loss(x, StepContext(sparsity_scale=0.5))
    pre = x @ sae.W_enc + sae.b_enc
    acts = pre * (pre > sae.threshold)
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(out.terms["mse"], ((acts @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean())
    assert torch.allclose(out.terms["sparsity"], 0.5 * 0.3 * torch.tanh(4 * acts.abs() * norms).sum(-1).mean())
    assert torch.allclose(out.terms["pre_act"], 0.2 * (torch.relu(sae.threshold - pre) * norms).sum(-1).mean())


@pytest.mark.parametrize("log_threshold", [False, True])
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_fold_scaling_makes_raw_inputs_exact(log_threshold, apply_b_dec):
    sae = make(log_threshold=log_threshold, apply_b_dec_to_input=apply_b_dec, target_l0=3)
    x = torch.randn(200, 6) * 7.0
    scale = 7.0 * 6 ** 0.5
    sae.init_from_data(x / scale)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.05)
    f_scaled = sae.encode(x / scale)
    recon_scaled = sae(x / scale)
    sae.fold_scaling(scale)
    assert torch.allclose(sae.encode(x), scale * f_scaled, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sae(x), scale * recon_scaled, rtol=1e-5, atol=1e-4)


def test_from_weights_round_trip_and_shape_errors():
    sae = make(target_l0=3)
    sae.init_from_data(torch.randn(100, 6))
    copy = jumprelu_from_weights(sae.W_enc.detach(), sae.W_dec.detach(), sae.b_enc.detach(),
                                 sae.b_dec.detach(), sae.threshold.detach(),
                                 apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input)
    x = torch.randn(20, 6)
    assert torch.equal(copy.encode(x), sae.encode(x))
    with pytest.raises(ValueError, match="inconsistent JumpReLU weight shapes"):
        jumprelu_from_weights(sae.W_enc.detach(), sae.W_dec.detach()[:5], sae.b_enc.detach(),
                              sae.b_dec.detach(), sae.threshold.detach())


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="target_l0"):
        JumpReLUConfig(d_in=4, d_sae=8, target_l0=9)
    with pytest.raises(ValueError, match="d_sae"):
        JumpReLUConfig(d_in=4, d_sae=0)
    with pytest.raises(ValueError, match="unknown 'jumprelu' preset 'nope'"):
        JumpReLUConfig.preset("nope", d_in=4, d_sae=8)
    paper = JumpReLUConfig.preset("paper", d_in=4, d_sae=8, l0_coefficient=0.5)
    assert (paper.lr, paper.log_threshold, paper.sparsity_warmup_steps, paper.l0_coefficient) == (7e-5, True, 10_000, 0.5)
    with pytest.raises(ValueError, match="last dimension d_in=6"):
        make().encode(torch.randn(3, 5))


def test_calibrate_scales_every_threshold_by_one_factor_to_reach_target_l0():
    generator = torch.Generator().manual_seed(3)
    sae = make(d_in=16, d_sae=64, target_l0=7)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(16, 64, generator=generator))
        sae.set_threshold(torch.rand(64, generator=generator) + 0.5)
    x = torch.randn(3000, 16, generator=generator)
    before = sae.threshold.clone()
    assert (sae.encode(x) > 0).sum(-1).float().mean() > 9  # far from the target before
    note = sae.calibrate(x, StepContext())
    l0 = (sae.encode(x) > 0).sum(-1).double().mean().item()
    # at or just under the target: one histogram bin (a factor of 1.00024) holds at most a few entries
    assert 7 - 0.01 <= l0 <= 7 and note["l0_after"] == pytest.approx(l0)
    ratio = sae.threshold / before
    assert torch.allclose(ratio, ratio[0].expand(64), rtol=1e-6) and ratio[0] > 1
    assert note["threshold_factor"] == pytest.approx(ratio[0].item(), rel=1e-6)
    with torch.no_grad():  # the factor is the smallest that reaches the target: a bin lower overshoots
        sae.set_threshold(before * note["threshold_factor"] / 1.0005)
    assert (sae.encode(x) > 0).sum(-1).double().mean().item() > 7


def test_calibrate_leaves_thresholds_alone_without_a_target_or_when_turned_off():
    x = torch.randn(500, 6)
    for sae in (make(l0_coefficient=1.0), make(target_l0=3, calibrate_l0=False),
                build(JumpReLUConfig.preset("paper", d_in=6, d_sae=10, target_l0=3))):
        before = sae.threshold.clone()
        assert sae.calibrate(x, StepContext()) is None
        assert torch.equal(sae.threshold, before)


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_pre_act_penalty_falls_linearly_to_zero_over_its_fraction_of_the_run(kernel):
    sae = make(d_sae=40, target_l0=4, pre_act_coefficient=0.2, pre_act_decay_fraction=0.5, kernel=kernel)
    x = torch.randn(64, 6)
    sae.init_from_data(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    full = 0.2 * (torch.relu(sae.threshold - pre) * sae.W_dec.norm(dim=1)).sum(-1).mean()
    for progress, factor in ((0.0, 1.0), (0.25, 0.5), (0.4, 0.2)):
        out = sae.loss(x, StepContext(progress=progress))
        assert torch.allclose(out.terms["pre_act"], factor * full, rtol=1e-5)
    for progress in (0.5, 0.9):  # spent: no term at all (the sparse kernel skips the gap pass)
        assert "pre_act" not in sae.loss(x, StepContext(progress=progress)).terms
    sae.cfg.pre_act_decay_fraction = None  # Anthropic's: full strength throughout
    assert torch.allclose(sae.loss(x, StepContext(progress=0.9)).terms["pre_act"], full, rtol=1e-5)


def test_pre_act_decay_fraction_must_be_positive():
    with pytest.raises(ValueError, match="pre_act_decay_fraction"):
        make(pre_act_decay_fraction=0.0)
