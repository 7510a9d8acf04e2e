"""The random controls of a model: the reference's TransformerLens init and our per-matrix redraw."""

import math

import pytest
import torch

from jumpscope.models.randomize import model_width, randomize_model
from tiny_models import build as build_model


def test_redraw_keeps_each_matrix_scale_and_no_structure():
    model, _ = build_model("gpt2")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert randomize_model(model, "redraw", seed=3) is model
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            assert not torch.equal(p, before[name]), name
            assert p.std().item() == pytest.approx(before[name].std().item(), rel=0.1), name
        else:
            assert torch.equal(p, before[name]), name  # norms and biases kept


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_init_draws_every_matrix_embeddings_included_from_one_std(family):
    """TransformerLens init_weights: N(0, 0.8 / sqrt(d_model)) for every weight matrix."""
    model, _ = build_model(family)
    d_model = model_width(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    randomize_model(model, "init", seed=0)
    matrices = [name for name, p in model.named_parameters() if p.dim() >= 2]
    assert any("emb" in name or "wte" in name for name in matrices)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.8 / math.sqrt(d_model)
            assert p.std().item() == pytest.approx(std, rel=0.15), name
            assert abs(p.mean().item()) < 5 * std / math.sqrt(p.numel()), name  # zero mean, within 5 sigma
        else:
            assert torch.equal(p, before[name]), name


def test_none_leaves_the_model_and_unknown_controls_are_refused():
    model, _ = build_model("gpt2")
    before = [p.detach().clone() for p in model.parameters()]
    randomize_model(model, "none")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="unknown control 'shuffle'"):
        randomize_model(model, "shuffle")
