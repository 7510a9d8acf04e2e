"""jumpscope.jacobian: the MLP as tensors, the active-latent Jacobian, its fallback and diagnostics."""

import math

import pytest
import torch
import transformers as tf
from torch import nn

from jumpscope.jacobian import (ACTIVATIONS, MLPFunction, activation_and_derivative, classify_response,
                                jacobian_active, jacobian_autograd, jacobian_sparsity, latent_response,
                                mlp_function, mlp_module, precompute)
from jumpscope.models.harvest import Harvester
from tiny_models import CASES, SMALL, build, ids_for

F64 = torch.float64
MLP_CASES = ["gpt2", "neox", "bert", "llama", "gemma", "gemma2"]  # plain x3, SwiGLU, GeGLU, GeGLU + post-norm


def boosted(name, seed=0):
    """A tiny model whose MLP weights are scaled up, so pre-activations are O(1) and the
    nonlinearity matters (the random init's std 0.02 keeps the MLP almost linear)."""
    model, family = build(name, seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("mlp.", "intermediate.dense", "output.dense")) and p.dim() == 2:
                p.mul_(15)
    return model, family


def problem(d, N=6, d_in=80, d_out=70, k_in=5, k_out=7, seed=0):
    """Random SAE weights, MLP inputs and active sets (float64)."""
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(d_in, d, generator=g, dtype=F64) / math.sqrt(d)
    enc = torch.randn(d, d_out, generator=g, dtype=F64) / math.sqrt(d)
    x = torch.randn(N, d, generator=g, dtype=F64) * 1.5
    a_in = torch.stack([torch.randperm(d_in, generator=g)[:k_in] for _ in range(N)])
    a_out = torch.stack([torch.randperm(d_out, generator=g)[:k_out] for _ in range(N)])
    return dec, x, a_in, enc, a_out


def naive(mlp, dec, x, a_in, enc, a_out, si, so, create_graph=False):
    """torch.autograd.functional.jacobian of the composed function, one token at a time."""
    out = []
    for n in range(x.shape[0]):
        def f(s, n=n):
            return (mlp((x[n] + si * (s @ dec[a_in[n]]))[None])[0] / so) @ enc[:, a_out[n]]
        out.append(torch.autograd.functional.jacobian(f, x.new_zeros(a_in.shape[1]), create_graph=create_graph))
    return torch.stack(out)


@pytest.mark.parametrize("name", list(CASES))
def test_mlp_function_reproduces_harvested_mlp_out(name):
    model, family = boosted(name)
    for layer in (0, 2):
        sites = [f"layers.{layer}.mlp_in", f"layers.{layer}.mlp_out"]
        acts = Harvester(model, sites).activations(ids_for())
        mlp = mlp_function(model, layer)
        assert (mlp.family, mlp.layer) == (family, layer)
        x, y = acts[sites[0]], acts[sites[1]]
        torch.testing.assert_close(mlp(x), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))
        torch.testing.assert_close(mlp_module(model, layer)(x), y)
    expect = {"llama": "gated", "gemma2": "gated"}.get(family, "plain")
    assert mlp.kind == expect and (mlp.norm_weight is not None) == (family == "gemma2")


@pytest.mark.parametrize("name", MLP_CASES)
def test_efficient_jacobian_matches_autograd(name):
    model, _ = boosted(name)
    mlp = mlp_function(model, 1).to(F64)
    dec, x, a_in, enc, a_out = problem(mlp.d_model)
    x = x * 3  # MLP input norms of the tiny models' post-norm activations
    si, so = 1.7, 0.45
    want = naive(mlp, dec, x, a_in, enc, a_out, si, so)
    assert want.abs().max() > 1e-3
    for J in (jacobian_active(mlp, dec, x, a_in, enc, a_out, si, so),
              jacobian_active(mlp, dec, x, a_in, enc, a_out, si, so, chunk_size=4),
              jacobian_active(mlp, dec, x, a_in, enc, a_out, si, so, weights=precompute(mlp, dec, enc)),
              jacobian_autograd(mlp, dec, x, a_in, enc, a_out, si, so),
              jacobian_autograd(mlp_module(model, 1), dec.float(), x.float(), a_in, enc.float(), a_out, si, so)):
        assert J.shape == (6, 7, 5)
        tol = 1e-10 if J.dtype == F64 else 1e-4
        torch.testing.assert_close(J.to(F64), want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("kind", ["plain", "gated", "normed"])
def test_every_activation_and_bias(activation, kind):
    g = torch.Generator().manual_seed(3)
    d, m = 12, 20
    w = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)  # noqa: E731
    mlp = MLPFunction("plain" if kind == "plain" else "gated", activation, w(d, m) / 2, w(m, d) / 3, w(m), w(d),
                      W_up=None if kind == "plain" else w(d, m) / 2, b_up=None if kind == "plain" else w(m),
                      norm_weight=1 + 0.3 * w(d) if kind == "normed" else None, norm_eps=1e-3)
    dec, x, a_in, enc, a_out = problem(d, seed=4)
    want = naive(mlp, dec, x, a_in, enc, a_out, 0.8, 1.9)
    torch.testing.assert_close(jacobian_active(mlp, dec, x, a_in, enc, a_out, 0.8, 1.9), want, rtol=1e-10, atol=1e-12)
    u = torch.linspace(-4, 4, 101, dtype=F64, requires_grad=True)
    value, grad = activation_and_derivative(activation)(u)
    torch.testing.assert_close(torch.autograd.grad(value.sum(), u)[0], grad)


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
def test_gradients_of_mean_abs_jacobian(name):
    model, _ = boosted(name)
    mlp = mlp_function(model, 0).to(F64)
    dec, x, a_in, enc, a_out = problem(mlp.d_model, seed=5)
    x = x * 3

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (dec, enc, x)]
        J = fn(leaves[0], leaves[2], leaves[1])
        return torch.autograd.grad(J.abs().mean(), leaves)

    want = grads(lambda d, xx, e: naive(mlp, d, xx, a_in, e, a_out, 1.3, 0.7, create_graph=True))
    got = [grads(lambda d, xx, e: jacobian_active(mlp, d, xx, a_in, e, a_out, 1.3, 0.7, chunk_size=4)),
           grads(lambda d, xx, e: jacobian_active(mlp, d, xx, a_in, e, a_out, 1.3, 0.7,
                                                  weights=precompute(mlp, d, e))),
           grads(lambda d, xx, e: jacobian_autograd(mlp, d, xx, a_in, e, a_out, 1.3, 0.7))]
    for g in got:
        for a, b in zip(g, want):
            assert b.abs().max() > 0
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_precomputed_weights_reuse_and_coverage():
    model, _ = boosted("llama")
    mlp = mlp_function(model, 2).to(F64)
    dec, x, a_in, enc, a_out = problem(mlp.d_model, seed=6)
    full = precompute(mlp, dec, enc)
    part = precompute(mlp, dec, enc, in_latents=torch.unique(a_in), out_latents=torch.unique(a_out))
    want = jacobian_active(mlp, dec, x, a_in, enc, a_out)
    torch.testing.assert_close(jacobian_active(mlp, dec, x, a_in, enc, a_out, weights=full), want)
    torch.testing.assert_close(jacobian_active(mlp, dec, x, a_in, enc, a_out, weights=part), want)
    other = a_in.clone()
    other[0, 0] = int(torch.tensor([i for i in range(80) if i not in set(a_in.flatten().tolist())])[0])
    with pytest.raises(ValueError, match="not computed for"):
        jacobian_active(mlp, dec, x, other, enc, a_out, weights=part)
    with pytest.raises(ValueError, match="outside"):
        jacobian_active(mlp, dec, x, a_in + 1000, enc, a_out)
    with pytest.raises(ValueError, match="in_active"):
        jacobian_active(mlp, dec, x, a_in[:2], enc, a_out)
    with pytest.raises(TypeError, match="MLPFunction"):
        jacobian_active(mlp_module(model, 2), dec, x, a_in, enc, a_out)
    with pytest.raises(ValueError, match="decoder"):
        jacobian_active(mlp, dec[:, :5], x, a_in, enc, a_out)


def test_bf16_mlp_with_float32_saes():
    model, _ = boosted("gpt2")
    mlp = mlp_function(model.to(torch.bfloat16), 1)
    dec, x, a_in, enc, a_out = (t.float() if t.is_floating_point() else t for t in problem(mlp.d_model))
    J = jacobian_active(mlp, dec, x, a_in, enc, a_out)
    assert J.dtype == torch.float32
    torch.testing.assert_close(J, jacobian_autograd(mlp.to(torch.float32), dec, x, a_in, enc, a_out), rtol=1e-4,
                               atol=1e-6)


def test_clear_errors_and_the_fallback():
    model, _ = build("llama")
    with pytest.raises(ValueError, match="out of range"):
        mlp_function(model, 3)
    with pytest.raises(ValueError, match="integer"):
        mlp_function(model, "1")
    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(**SMALL, hidden_act="quick_gelu")).eval()
    with pytest.raises(ValueError, match=r"family bert.*'quick_gelu'.*jacobian_autograd"):
        mlp_function(bert, 0)
    dec, x, a_in, enc, a_out = (t.float() if t.is_floating_point() else t for t in problem(32))
    fallback = mlp_module(bert, 0)  # the autograd fallback covers what the formula refuses
    torch.testing.assert_close(jacobian_autograd(fallback, dec, x, a_in, enc, a_out),
                               naive(fallback, dec, x, a_in, enc, a_out, 1.0, 1.0), rtol=1e-5, atol=1e-7)

    model.model.layers[1].mlp = nn.Identity()  # a layer without an MLP
    with pytest.raises(ValueError, match=r"family llama.*gate_proj.*Identity"):
        mlp_function(model, 1)
    model.model.layers[2].mlp.act_fn = nn.ReLU()  # config says silu: the formula would be wrong
    with pytest.raises(ValueError, match="does not reproduce"):
        mlp_function(model, 2)
    gemma2, _ = build("gemma2")
    gemma2.model.layers[0].post_feedforward_layernorm = nn.LayerNorm(32)
    with pytest.raises(ValueError, match=r"family gemma2.*LayerNorm.*jacobian_autograd"):
        mlp_function(gemma2, 0)
    generic = tf.GPTJModel(tf.GPTJConfig(vocab_size=97, n_embd=32, n_layer=2, n_head=4, rotary_dim=4))
    with pytest.raises(ValueError, match="mlp_in"):
        mlp_function(generic, 0)
    with pytest.raises(ValueError, match="unsupported MLP activation"):
        MLPFunction("plain", "tanh", torch.zeros(4, 8), torch.zeros(8, 4))
    with pytest.raises(ValueError, match="W_out"):
        MLPFunction("plain", "relu", torch.zeros(4, 8), torch.zeros(4, 8))


def test_jacobian_sparsity():
    J = torch.tensor([0.001, -0.006, 0.011, -0.03, 0.0, 0.5, -0.015, 0.003]).reshape(2, 2, 2)
    assert jacobian_sparsity(J) == {0.005: 5 / 8, 0.01: 4 / 8, 0.02: 2 / 8}
    assert jacobian_sparsity(J, thresholds=(0.1,)) == {0.1: 1 / 8}
    with pytest.raises(ValueError):
        jacobian_sparsity(torch.zeros(0, 3, 3))


def test_latent_response_slope_is_the_jacobian_entry():
    model, _ = boosted("neox")
    mlp = mlp_function(model, 0).to(F64)
    dec, x, a_in, enc, a_out = problem(mlp.d_model, seed=8)
    J = jacobian_active(mlp, dec, x * 3, a_in, enc, a_out, 1.3, 0.7)
    i, j, h = int(a_in[2, 1]), int(a_out[2, 3]), 1e-5
    values = torch.tensor([0.4 - h, 0.4 + h], dtype=F64)
    bias = torch.randn(70, dtype=F64)
    r = latent_response(mlp, dec, enc, x[2] * 3, i, j, values, base_value=0.4, in_scale=1.3, out_scale=0.7,
                        out_bias=bias)
    torch.testing.assert_close((r[1] - r[0]) / (2 * h), J[2, 3, 1], rtol=1e-6, atol=1e-9)
    at_base = latent_response(mlp, dec, enc, x[2] * 3, i, j, torch.tensor([0.4], dtype=F64), base_value=0.4,
                              in_scale=1.3, out_scale=0.7, out_bias=bias)
    torch.testing.assert_close(at_base[0], (mlp(x[2:3] * 3)[0] / 0.7) @ enc[:, j] + bias[j])
    relu = latent_response(mlp, dec, enc, x[2] * 3, i, j, values, out_bias=bias, out_activation=torch.relu)
    torch.testing.assert_close(relu, torch.relu(latent_response(mlp, dec, enc, x[2] * 3, i, j, values,
                                                                out_bias=bias)))


def test_classify_response():
    v = torch.linspace(0, 4, 41)
    noise = 0.002 * torch.sin(37 * v)
    assert classify_response(v, 0.7 * v - 0.2 + noise) == "linear"
    assert classify_response(v, torch.zeros_like(v)) == "linear"
    assert classify_response(v.flip(0), (0.7 * v - 0.2).flip(0)) == "linear"  # order does not matter
    assert classify_response(v, torch.where(v >= 1.5, 0.5 + 0.8 * (v - 1.5), 0.0) + noise) == "jumprelu-like"
    assert classify_response(v, torch.relu(1.2 * (v - 2.0))) == "jumprelu-like"
    assert classify_response(v, (v - 2) ** 2) == "other"
    assert classify_response(v, torch.sin(2 * v)) == "other"
    assert classify_response(v, torch.where(v >= 1.5, 0.0, 1.0 - 0.1 * v)) == "other"  # linear then zero
    assert classify_response(v, torch.where(v >= 1.5, (v - 1.5) ** 2 + 1, 0.0)) == "other"  # not linear above
    with pytest.raises(ValueError):
        classify_response(v, v[:-1])
