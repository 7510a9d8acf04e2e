"""Splicing SAEs into models: the right tensor is replaced, the error term restores it exactly."""

import pytest
import torch

from jumpscope.models.harvest import Harvester
from jumpscope.models.sites import LAYER_SITE_KINDS, parse_site
from jumpscope.models.splice import reconstruct, splice
from jumpscope.sae import build as build_sae
from exact_saes import exact_sae, zero_sae
from tiny_models import build, ids_for

FAMILIES = ["llama", "gemma2", "gpt2", "neox", "bert"]


def output_of(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", FAMILIES)
def test_keep_error_and_exact_saes_leave_the_model_unchanged(name):
    model, _ = build(name)
    ids = ids_for()
    clean = output_of(model, ids)
    for kind in LAYER_SITE_KINDS:
        site = f"layers.1.{kind}"
        d = parse_site(site, model.base_model).d
        random_sae = build_sae("jumprelu", d_in=d, d_sae=3 * d, seed=4)
        with splice(model, {site: random_sae}, keep_error=True):
            assert torch.allclose(output_of(model, ids), clean, atol=1e-4), site
        with splice(model, {site: exact_sae(d)}):
            assert torch.allclose(output_of(model, ids), clean, atol=1e-4), site
        with splice(model, {site: random_sae}):  # a real replacement changes the output
            assert not torch.allclose(output_of(model, ids), clean, atol=1e-3), site
    assert torch.equal(output_of(model, ids), clean)  # hooks gone


@pytest.mark.parametrize("name", ["llama", "gpt2", "neox", "bert"])
def test_zero_splices_at_the_same_tensor_agree(name):
    model, _ = build(name)
    ids = ids_for()
    d = parse_site("layers.0.resid_post", model.base_model).d
    with splice(model, {"layers.0.resid_post": zero_sae(d)}):
        after_post = output_of(model, ids)
    with splice(model, {"layers.1.resid_pre": zero_sae(d)}):
        after_pre = output_of(model, ids)
    assert torch.allclose(after_post, after_pre, atol=1e-5)


def test_spliced_site_sees_the_reconstruction_downstream():
    model, _ = build("llama")
    ids = ids_for()
    d = parse_site("layers.0.mlp_out", model.base_model).d
    sae = build_sae("jumprelu", d_in=d, d_sae=64, seed=3)
    clean = Harvester(model, ["layers.0.mlp_out", "layers.0.resid_pre", "layers.0.attn_out"]).activations(ids)
    with splice(model, {"layers.0.mlp_out": sae}):
        spliced = Harvester(model, ["layers.0.resid_post"]).activations(ids)["layers.0.resid_post"]
    expected = clean["layers.0.resid_pre"] + clean["layers.0.attn_out"] + reconstruct(sae, clean["layers.0.mlp_out"])
    assert torch.allclose(spliced, expected, atol=1e-5)


def test_several_saes_and_bad_widths():
    model, _ = build("gpt2")
    ids = ids_for()
    clean = output_of(model, ids)
    d = parse_site("layers.0.resid_post", model.base_model).d
    with splice(model, {"layers.0.resid_post": zero_sae(d), "layers.1.resid_post": exact_sae(d)}):
        both = output_of(model, ids)
    with splice(model, {"layers.0.resid_post": zero_sae(d)}):
        one = output_of(model, ids)
    assert torch.allclose(both, one, atol=1e-5)
    wrong = build_sae("jumprelu", d_in=d + 1, d_sae=8, site="layers.2.resid_post")
    with pytest.raises(ValueError, match=r"d_in=33 does not fit site 'layers.0.resid_post'.*width 32.*trained on"):
        with splice(model, {"layers.0.resid_post": wrong}):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with splice(model, {"layers.9.resid_post": zero_sae(d)}):
            pass
    assert torch.equal(output_of(model, ids), clean)  # a failed splice leaves no hook behind


def test_reconstruct_refuses_activations_of_another_width():
    sae = build_sae("jumprelu", d_in=8, d_sae=16, site="layers.0.mlp_out")
    with pytest.raises(ValueError, match=r"d_in=8 cannot splice into activations of width 9 \(it was trained on "):
        reconstruct(sae, torch.zeros(2, 3, 9))
