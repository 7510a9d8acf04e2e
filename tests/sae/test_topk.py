"""TopK and BatchTopK SAEs: exact sparsity, AuxK (value and gradient path), running threshold,
exact JumpReLU export of BatchTopK, input-scale fold, validation."""

from __future__ import annotations

import pytest
import torch
from sae_checks import (assert_fold_takes_raw_inputs, loss_before_and_after, randomize, sample,  # noqa: F401
                        sparse_dictionary_data)

from jumpscope.sae import StepContext, build, get_class
from jumpscope.sae.batchtopk import BatchTopKSAE, BatchTopKSAEConfig
from jumpscope.sae.jumprelu import JumpReLUSAE
from jumpscope.sae.topk import TopKSAE, TopKSAEConfig


def randomized(cls=TopKSAE, seed: int = 0, bias: float = 0.0, **fields):
    cfg_cls = cls.config_class
    sae = randomize(cls(cfg_cls(**{"d_in": 6, "d_sae": 24, "k": 4, **fields})), seed)
    with torch.no_grad():
        sae.b_enc.add_(bias)
    return sae


def pre_reference(sae, x):
    return (x - sae.b_dec) @ sae.W_enc + sae.b_enc


# -- TopK ------------------------------------------------------------------------------------
def test_registered_with_its_contract():
    assert get_class("topk") is TopKSAE and get_class("batchtopk") is BatchTopKSAE
    sae = build("topk", d_in=10, d_sae=16, k=3)
    assert sae.sparsity_coefficient() is None
    assert sae.cfg.aux_k == 5  # d_in // 2
    assert build("batchtopk", d_in=10, d_sae=16, k=3).sparsity_coefficient() is None


def test_topk_keeps_exactly_the_k_largest():
    sae = randomized(bias=5.0)  # every pre-activation positive, so L0 is exactly k
    x = sample()
    f = sae.encode(x)
    assert torch.equal((f > 0).sum(-1), torch.full((64,), 4))
    pre = pre_reference(sae, x)
    top = pre.argsort(dim=-1, descending=True)[:, :4]
    expected = torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top))
    torch.testing.assert_close(f, expected)


def test_topk_relus_the_kept_values():
    sae = randomized(bias=-1.0)
    f = sae.encode(sample())
    assert (f >= 0).all()
    assert ((f > 0).sum(-1) <= 4).all() and ((f > 0).sum(-1) < 4).any()


def tiny_topk() -> TopKSAE:
    sae = TopKSAE(TopKSAEConfig(d_in=2, d_sae=4, k=1, k_aux=2, aux_coefficient=0.5, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0, -1.0], [0.0, 1.0, 1.0, 0.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -2.0, 0.2]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]))
        sae.b_dec.zero_()
    return sae


def test_loss_and_auxk_match_hand_computation():
    sae = tiny_topk()
    x = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])
    dead = torch.tensor([False, False, True, True])
    # token 1: z = [3, 1, 2, -2.8]; f = [3, 0, 0, 0]; e = [0, 1]; mse 1
    #   dead z = [2, -2.8] -> ReLU [2, 0]; e_hat = [2, 2]; ||e - e_hat||^2 = 5
    # token 2: z = [-1, 2, -1, 1.2]; f = [0, 2, 0, 0]; e = [-1, 0]; mse 1
    #   dead z = [-1, 1.2] -> ReLU [0, 1.2]; e_hat = [2.4, 0]; ||e - e_hat||^2 = 11.56
    out = sae.loss(x, StepContext(dead_mask=dead))
    torch.testing.assert_close(out.feature_acts, torch.tensor([[3.0, 0, 0, 0], [0, 2.0, 0, 0]]))
    torch.testing.assert_close(out.terms["mse"], torch.tensor(1.0))
    torch.testing.assert_close(out.terms["aux"], torch.tensor(0.5 * 8.28))
    torch.testing.assert_close(out.loss, torch.tensor(1.0 + 4.14))


def test_auxk_is_zero_without_dead_latents():
    sae = tiny_topk()
    x = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])
    for mask in (None, torch.zeros(4, dtype=torch.bool)):
        out = sae.loss(x, StepContext(dead_mask=mask))
        assert out.terms["aux"].item() == 0.0
        torch.testing.assert_close(out.loss, out.terms["mse"])


def test_auxk_uses_only_dead_latents_and_at_most_n_dead():
    sae = randomized(bias=0.5, k_aux=8)
    x = sample()
    dead = torch.zeros(24, dtype=torch.bool)
    dead[[1, 7, 11]] = True  # fewer dead latents than k_aux
    out = sae.loss(x, StepContext(dead_mask=dead))
    pre = pre_reference(sae, x)
    error = x - out.reconstruction
    aux_acts = torch.where(dead, pre.clamp(min=0), torch.zeros_like(pre))
    expected = ((error - aux_acts @ sae.W_dec) ** 2).sum(-1).mean()
    torch.testing.assert_close(out.terms["aux"], sae.cfg.aux_coefficient * expected)


def test_auxk_gradient_reaches_the_encoder_of_dead_latents():
    sae = randomized(bias=0.0)
    dead = torch.zeros(24, dtype=torch.bool)
    dead[12:] = True
    with torch.no_grad():  # live 0..3 always win the top-k; dead ones are positive but lose
        sae.b_enc[:4] = 20.0
        sae.b_enc[4:12] = -20.0
        sae.b_enc[12:] = 3.0
    x = sample()
    assert (pre_reference(sae, x)[:, 12:] > 0).float().mean() > 0.5
    sae.loss(x, StepContext(dead_mask=dead)).terms["mse"].backward()
    assert (sae.W_enc.grad[:, 12:] == 0).all()  # the main loss never sees the dead latents
    sae.zero_grad(set_to_none=True)
    sae.loss(x, StepContext(dead_mask=dead)).terms["aux"].backward()
    assert (sae.W_enc.grad[:, 12:].abs().sum(0) > 0).all()
    assert (sae.b_enc.grad[12:] != 0).all()
    assert (sae.W_enc.grad[:, :12] == 0).all()


def test_init_from_data_sets_b_dec_to_the_mean():
    sae = build("topk", d_in=6, d_sae=24, k=4)
    x = sample() + 3.0
    sae.init_from_data(x)
    torch.testing.assert_close(sae.b_dec.data, x.mean(0))


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
def test_fold_scaling_takes_raw_inputs(cls):
    sae = randomized(cls, bias=0.3)
    if cls is BatchTopKSAE:
        sae.loss(sample(seed=5), StepContext())  # estimate a threshold
        sae.eval()
        assert sae.threshold.item() > 0
    s = 2.5
    x_raw = sample() * s
    folded = assert_fold_takes_raw_inputs(sae, s, x_raw)


@pytest.mark.parametrize(("fields", "message"), [
    (dict(k=0), "k must"), (dict(k=25), "k must"), (dict(k=2.5), "k must"),
    (dict(k_aux=0), "k_aux"), (dict(k_aux=30), "k_aux"), (dict(aux_coefficient=-1.0), "aux_coefficient"),
    (dict(d_out=3), "apply_b_dec_to_input"),  # the default b_dec-on-input needs d_out == d_in
])
@pytest.mark.parametrize("cfg_cls", [TopKSAEConfig, BatchTopKSAEConfig])
def test_bad_config_raises(cfg_cls, fields, message):
    cfg_cls(d_in=6, d_sae=24, k=4)  # the baseline is valid
    with pytest.raises(ValueError, match=message):
        cfg_cls(**{"d_in": 6, "d_sae": 24, "k": 4, **fields})


@pytest.mark.parametrize("momentum", [-0.1, 1.0])
def test_bad_threshold_momentum_raises(momentum):
    with pytest.raises(ValueError, match="threshold_momentum"):
        BatchTopKSAEConfig(d_in=6, d_sae=24, k=4, threshold_momentum=momentum)


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
def test_wrong_input_width_raises(cls):
    sae = randomized(cls)
    with pytest.raises(ValueError, match="d_in=6"):
        sae.encode(torch.zeros(2, 4))
    sae.eval()
    with pytest.raises(ValueError, match="d_in=6"):
        sae.encode(torch.zeros(2, 4))


# -- BatchTopK -------------------------------------------------------------------------------
def test_batchtopk_keeps_k_times_batch_over_the_whole_batch():
    sae = randomized(BatchTopKSAE, bias=5.0)
    x = sample(32)
    out = sae.loss(x, StepContext())
    per_token = (out.feature_acts > 0).sum(-1)
    assert per_token.sum().item() == 4 * 32
    assert per_token.min() < 4 < per_token.max()  # not per-token top-k
    flat = pre_reference(sae, x).clamp(min=0).reshape(-1)
    top = flat.argsort(descending=True)[: 4 * 32]
    expected = torch.zeros_like(flat).scatter(0, top, flat[top]).reshape(32, 24)
    torch.testing.assert_close(out.feature_acts, expected)


def test_batchtopk_running_threshold():
    sae = randomized(BatchTopKSAE, bias=0.2, threshold_momentum=0.9)
    assert "threshold" in sae.state_dict() and sae.threshold.item() == 0.0

    def smallest_kept(x):
        flat = pre_reference(sae, x).clamp(min=0).reshape(-1).sort(descending=True).values[: 4 * len(x)]
        return flat[flat > 0].min().item()

    x1, x2 = sample(32, seed=2), sample(32, seed=3)
    t1, t2 = smallest_kept(x1), smallest_kept(x2)
    sae.loss(x1, StepContext())
    assert sae.threshold.item() == pytest.approx(t1, rel=1e-6)  # the first batch initialises it
    sae.loss(x2, StepContext())
    assert sae.threshold.item() == pytest.approx(0.9 * t1 + 0.1 * t2, rel=1e-6)
    sae.encode(x1)  # encode never updates it
    sae.eval()
    sae.loss(x1, StepContext())  # nor does an eval-mode loss
    assert sae.threshold.item() == pytest.approx(0.9 * t1 + 0.1 * t2, rel=1e-6)


def test_batchtopk_eval_encode_uses_the_threshold():
    sae = randomized(BatchTopKSAE, bias=0.2)
    sae.loss(sample(seed=4), StepContext())
    sae.eval()
    x = sample()
    pre = pre_reference(sae, x)
    expected = pre * (pre > sae.threshold)
    f = sae.encode(x)
    torch.testing.assert_close(f, expected)
    assert ((f > 0).sum(-1) != 4).any()  # the threshold, not a per-token top-k


@pytest.mark.parametrize("estimated", [True, False])
def test_batchtopk_calibration_sets_the_threshold_for_a_mean_l0_of_k(estimated):
    sae = randomized(BatchTopKSAE, bias=0.2, calibrate_l0=True)
    if estimated:
        sae.loss(sample(seed=4), StepContext())  # the running estimate, else 0 (never estimated)
    x = sample(2000, seed=5)
    note = sae.calibrate(x, StepContext())
    assert sae.training  # the mode is restored
    sae.eval()
    l0 = (sae.encode(x) > 0).sum(-1).double().mean().item()
    assert 4 - 0.01 <= l0 <= 4 and note["l0_after"] == pytest.approx(l0)
    # the threshold the whole rows' batch top-k would keep: the (4 n)-th largest ReLU'd pre-activation
    kth = pre_reference(sae, x).clamp(min=0).reshape(-1).sort(descending=True).values[4 * len(x) - 1]
    assert sae.threshold.item() == pytest.approx(kth.item(), rel=5e-4)
    assert randomized(BatchTopKSAE, calibrate_l0=False).calibrate(x, StepContext()) is None  # the paper's estimator


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_batchtopk_export_is_an_exactly_equivalent_jumprelu(apply_b_dec):
    sae = randomized(BatchTopKSAE, bias=0.2, apply_b_dec_to_input=apply_b_dec)
    sae.loss(sample(seed=4), StepContext())
    sae.eval()
    exported = sae.export()
    assert isinstance(exported, JumpReLUSAE)
    assert torch.equal(exported.threshold, sae.threshold.expand(24))
    x = sample(256)
    f = sae.encode(x)
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(exported.encode(x), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported(x), sae(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
def test_training_reduces_loss(cls):
    x = sparse_dictionary_data()
    sae = cls(cls.config_class(d_in=16, d_sae=64, k=4))
    sae.init_from_data(x)
    first, last = loss_before_and_after(sae, x, dead_mask=torch.zeros(64, dtype=torch.bool))
    assert last < 0.5 * first
