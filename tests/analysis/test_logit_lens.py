"""Logit lens: the final norm's gain read off the real norm module, the lens against the logit
change the real head computes, and clear errors for encoders and wrong widths."""

import pytest
import torch

from jumpscope.analysis import logit_lens, unembedding
from jumpscope.analysis.logit_lens import FINAL_NORMS
from jumpscope.sae import build
from tiny_models import build as build_model


def final_norm(model):
    base = model.base_model
    return next(getattr(base, name) for name in FINAL_NORMS if isinstance(getattr(base, name, None), torch.nn.Module))


@pytest.mark.parametrize("name", ["llama", "gemma", "gemma2", "gpt2", "neox"])
def test_gain_is_what_the_norm_module_applies(name):
    """For x with mean 0 and rms 1 (alternating +-1) every norm kind gives norm(x) = gain * x + bias,
    so (norm(x) - norm(-x)) / 2x is the gain, whatever the module's parametrisation (Gemma's 1 + w)."""
    model, _ = build_model(name)
    W_U, gain = unembedding(model)
    d = W_U.shape[1]
    x = torch.tensor([1.0, -1.0] * (d // 2))
    norm = final_norm(model)
    with torch.no_grad():
        measured = (norm(x[None]) - norm(-x[None]))[0] / (2 * x)
    torch.testing.assert_close(gain, measured, atol=1e-3, rtol=1e-3)  # eps inside the rms: ~1e-5 off


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_lens_matches_the_heads_logit_change(name):
    """Adding a small multiple of a mean-free direction to a mean-free, unit-rms residual changes
    the real head's logits by (nearly) t * W_U (gain * direction): the lens ranks tokens the same."""
    model, _ = build_model(name)
    d = model.config.hidden_size
    sae = build("relu", d_in=d, d_sae=6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(6, d, generator=g))
        sae.W_dec.sub_(sae.W_dec.mean(dim=1, keepdim=True))
    lens = logit_lens(sae, model, n=5)
    h = torch.tensor([1.0, -1.0] * (d // 2))
    norm, head = final_norm(model), model.get_output_embeddings()
    for latent in range(6):
        direction = sae.W_dec[latent].detach()
        direction = direction - (direction @ h) / (h @ h) * h  # keep rms(h + t d) ~ rms(h) to first order
        with torch.no_grad():
            change = (head(norm((h + 1e-3 * direction)[None])) - head(norm(h[None])))[0] / 1e-3
        expected = (unembedding(model)[0] @ (unembedding(model)[1] * direction))
        torch.testing.assert_close(change, expected, atol=2e-2 * float(expected.abs().max()), rtol=0)
    assert lens.promoted_ids.shape == (6, 5) and lens.suppressed_ids.shape == (6, 5)
    assert (lens.promoted_values[:, :-1] >= lens.promoted_values[:, 1:]).all()
    assert (lens.promoted_values[:, 0] > lens.suppressed_values[:, 0]).all()
    W_U, gain = unembedding(model)
    for latent in range(6):
        full = W_U @ (gain * sae.W_dec[latent].detach())
        assert set(lens.promoted_ids[latent].tolist()) == set(full.topk(5).indices.tolist())
        assert set(lens.suppressed_ids[latent].tolist()) == set((-full).topk(5).indices.tolist())


def test_lens_chunks_agree_and_errors():
    model, _ = build_model("llama")
    sae = build("relu", d_in=model.config.hidden_size, d_sae=10)
    whole, chunked = logit_lens(sae, model, n=4), logit_lens(sae, model, n=4, chunk=3)
    assert torch.equal(whole.promoted_ids, chunked.promoted_ids)
    encoder, _ = build_model("bert", __import__("transformers").BertModel)
    with pytest.raises(ValueError, match="causal LM"):
        logit_lens(build("relu", d_in=32, d_sae=4), encoder)
    with pytest.raises(ValueError, match="unembedding reads"):
        logit_lens(build("relu", d_in=model.config.hidden_size + 1, d_sae=4), model)
