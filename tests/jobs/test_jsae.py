"""The Jacobian SAE job's held-out measures, against independent computations."""

import pytest
import torch

from jumpscope.jacobian import JacobianSAE, JacobianSAEConfig, mlp_function
from jumpscope.jobs.jsae import JsaeJobConfig, held_out_jacobian
from jumpscope.models.harvest import Harvester
from jacobian_reference import autograd_jacobian
from tiny_models import build as build_model

LAYER = 1


def test_held_out_measures_at_both_points_and_the_scale_ratio_match_autograd_and_the_harvest():
    model, _ = build_model("gpt2")
    ids = torch.randint(3, 90, (3, 10), generator=torch.Generator().manual_seed(1))
    acts = Harvester(model, [f"layers.{LAYER}.mlp_in", f"layers.{LAYER}.mlp_out"]).activations(ids)
    x, y = acts[f"layers.{LAYER}.mlp_in"].reshape(-1, 32), acts[f"layers.{LAYER}.mlp_out"].reshape(-1, 32)
    pair = JacobianSAE(JacobianSAEConfig(d_in=32, d_sae=64, k=4)).attach_mlp(mlp_function(model, LAYER))
    measures = held_out_jacobian(pair, [x[:12], x[12:]], scale=2.0)
    # b / a from the model's own harvested MLP output, not from the MLP function the pair holds
    assert measures["out_in_scale_ratio"] == pytest.approx(float(y.norm() / x.norm()), rel=1e-5)
    for point in ("input", "reconstruction"):
        J = autograd_jacobian(pair, x, point) * 2.0
        at = measures[f"at_{point}"]
        assert at["mean_abs"] == pytest.approx(float(J.abs().mean()), rel=1e-4)
        for threshold in (0.005, 0.01, 0.015, 0.02):
            assert at[f"above_{threshold:g}"] == pytest.approx(float((J.abs() > threshold).float().mean()), abs=2e-3)
    assert measures["at_input"] != measures["at_reconstruction"]


@pytest.mark.parametrize("fields, message", [
    (dict(controls=("none", "shuffle")), "controls must be one or more of none, init, redraw"),
    (dict(controls=()), "controls must be one or more"),
    (dict(controls=("init", "init")), "repeat"),
    (dict(jacobian_coefficients=(1.0, -0.5)), "must be >= 0"),
    (dict(recipe="fast"), "recipe must be 'paper' or 'normalised'"),
])
def test_careless_job_options_are_one_line_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        JsaeJobConfig(**fields)
