"""The public API of the README, end to end on synthetic data with a known dictionary."""

import pytest
import torch

import jumpscope
from jumpscope.data.synthetic import SyntheticActivations, SyntheticConfig
from jumpscope.sae.jumprelu import JumpReLUConfig
from jumpscope.sae.topk import TopKSAEConfig


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticActivations(SyntheticConfig(d_in=32, n_features=128, true_l0=24, seed=0))


def test_jumprelu_trained_on_synthetic_data_reaches_a_target_l0_of_20(synthetic):
    configs = [JumpReLUConfig(d_in=32, d_sae=256, target_l0=20, bandwidth=0.01)]
    saes = jumpscope.train(configs, synthetic.batches(1024, 300, seed=1), total_tokens=1024 * 250,
                           batch_size=1024, progress=False)
    sae = saes["jumprelu_0"]
    held_out = next(iter(synthetic.batches(4096, 1, seed=99)))
    l0 = (sae.encode(held_out) > 0).sum(-1).float().mean().item()
    assert abs(l0 - 20) <= 0.2 * 20, l0


def test_readme_api(tmp_path, synthetic):
    saes = jumpscope.train({"topk": TopKSAEConfig(d_in=32, d_sae=64, k=4)}, synthetic.batches(512, 20, seed=2),
                           total_tokens=512 * 16, batch_size=512, progress=False)
    x = next(iter(synthetic.batches(64, 1, seed=3)))
    sae = saes["topk"]
    f = sae.encode(x)
    assert f.shape == (64, 64) and torch.equal(sae(x), sae.decode(f))
    jump = jumpscope.train([JumpReLUConfig(d_in=32, d_sae=64, target_l0=4)], synthetic.batches(512, 20, seed=2),
                           total_tokens=512 * 16, batch_size=512, progress=False)["jumprelu_0"]
    for fmt, path in (("native", tmp_path / "n"), ("gemma-scope", tmp_path / "g"), ("saelens", tmp_path / "s")):
        jump.save(path, format=fmt)
        loaded = jumpscope.load(path)
        if fmt == "gemma-scope":  # no input centring there: b_dec folded into b_enc, equal up to rounding
            torch.testing.assert_close(loaded.encode(x), jump.encode(x), rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(loaded.encode(x), jump.encode(x)), fmt
        assert torch.equal(loaded.threshold, jump.threshold), fmt
    with pytest.raises(ValueError, match="unknown SAE format 'onnx'"):
        jump.save(tmp_path / "o", format="onnx")
    with pytest.raises(ValueError, match="unknown SAE architecture 'relu2'"):
        jumpscope.build("relu2", d_in=4, d_sae=8)
    with pytest.raises(ValueError, match=r"unknown 'jumprelu' config fields: \['lamda'\]"):
        jumpscope.build("jumprelu", d_in=4, d_sae=8, lamda=0.1)
