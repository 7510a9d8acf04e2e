"""sae/step.py: what a loss hands the trainer."""

import pytest
import torch

from jumpscope.sae import LossOutput, StepContext
from jumpscope.sae.step import SparseActs


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


def _sparse_example():
    # rows 0..1 of a (2, 4) matrix: (0, 1) = 2.0, (0, 3) = 0.0 (a window entry: silent), (1, 1) = 5.0
    flat, cols = torch.tensor([1, 3, 5]), torch.tensor([1, 3, 1])
    values = torch.tensor([2.0, 0.0, 5.0], requires_grad=True)
    dense = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    return SparseActs(flat, cols, values, (2, 4)), values, dense


def test_sparse_acts_build_the_dense_tensor_only_when_read_and_count_only_positive_entries():
    acts, values, dense = _sparse_example()
    assert acts._dense is None
    assert torch.equal(acts.firing_counts(), torch.tensor([0, 2, 0, 0]))
    assert acts.active_total().item() == 2.0 and acts._dense is None
    assert torch.equal(acts.to_dense().detach(), dense) and acts.to_dense() is acts.to_dense()
    (acts.to_dense() * torch.arange(8.0).view(2, 4)).sum().backward()  # d/d value = its position
    assert torch.equal(values.grad, torch.tensor([1.0, 3.0, 5.0]))


def test_sparse_acts_take_over_a_buffer_and_reshape_like_the_tensor():
    flat, cols = torch.tensor([1, 3, 5]), torch.tensor([1, 3, 1])
    buffer = torch.full((2, 4), 7.0)  # e.g. the detached pre-activations, free after selection
    acts = SparseActs(flat, cols, torch.tensor([2.0, 0.0, 5.0]), (2, 4), buffer).reshape(1, 2, 4)
    dense = acts.to_dense()
    assert dense.shape == (1, 2, 4) and dense.data_ptr() == buffer.data_ptr()
    assert torch.equal(dense, torch.tensor([[[0.0, 2.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]]]))
    with pytest.raises(ValueError, match="cannot view"):
        acts.reshape(2, 2, 2)


def test_loss_output_reads_firings_and_l0_alike_from_sparse_and_dense_acts():
    acts, _, dense = _sparse_example()
    loss, terms, recon = torch.tensor(0.0), {}, torch.zeros(2, 4)
    sparse_out, dense_out = LossOutput(loss, terms, acts, recon), LossOutput(loss, terms, dense, recon)
    expected_fired = torch.tensor([False, True, False, False])
    for out in (sparse_out, dense_out):
        assert torch.equal(out.fired_latents(), expected_fired)
        assert out.mean_l0().item() == 1.0  # one positive act in each row
    assert torch.equal(sparse_out.feature_acts.detach(), dense)


def test_sparse_acts_compute_flat_indices_only_when_the_dense_tensor_is_read():
    calls = []

    def flat_indices():
        calls.append(1)
        return torch.tensor([1, 3, 5])

    acts = SparseActs(flat_indices, torch.tensor([1, 3, 1]), torch.tensor([2.0, 0.0, 5.0]), (2, 4)).reshape(1, 2, 4)
    assert torch.equal(acts.firing_counts(), torch.tensor([0, 2, 0, 0])) and not calls
    assert torch.equal(acts.to_dense(), torch.tensor([[[0.0, 2.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]]]))
    assert torch.equal(acts.flat, torch.tensor([1, 3, 5])) and len(calls) == 1
