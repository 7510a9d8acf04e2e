"""Checks and fixtures shared by the architecture tests."""

import copy

import torch


def sample(n: int = 64, d: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def randomize(sae, seed: int = 0, scale: float = 0.5):
    """Overwrite every parameter with seeded Gaussian values (so biases are non-zero too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return sae


def assert_fold_takes_raw_inputs(sae, scale: float, x_raw: torch.Tensor):
    """After fold_scaling(s), raw inputs give s times what the unfolded SAE gives on x / s."""
    folded = copy.deepcopy(sae)
    folded.fold_scaling(scale)
    torch.testing.assert_close(folded.encode(x_raw), scale * sae.encode(x_raw / scale), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded(x_raw), scale * sae(x_raw / scale), atol=1e-5, rtol=1e-5)
    return folded
