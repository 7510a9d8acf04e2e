"""sae/step.py: what a loss hands the trainer."""

import torch

from jumpscope.sae import LossOutput, StepContext


def test_with_skip_adds_the_skip_prediction_to_the_reconstruction_only():
    out = LossOutput(torch.tensor(1.0), {"mse": torch.tensor(1.0)}, torch.ones(2, 3), torch.zeros(2, 4))
    assert out.with_skip(None) is out
    skipped = out.with_skip(torch.full((2, 4), 0.5))
    assert torch.equal(skipped.reconstruction, torch.full((2, 4), 0.5)) and torch.equal(out.reconstruction, torch.zeros(2, 4))
    assert skipped.loss is out.loss and skipped.feature_acts is out.feature_acts


def test_a_default_context_is_one_process_at_step_zero_in_scaled_units():
    ctx = StepContext()
    assert (ctx.step, ctx.sparsity_scale, ctx.input_scale, ctx.output_scale) == (0, 1.0, 1.0, 1.0)
    assert ctx.dead_mask is None and ctx.batch_mean is None
