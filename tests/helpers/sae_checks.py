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


def sparse_dictionary_data(n: int = 512, d: int = 16, n_features: int = 32, seed: int = 0) -> torch.Tensor:
    """Sparse nonnegative codes over a random unit dictionary: easy data to drive a loss down."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(n_features, d, generator=generator), dim=1)
    codes = torch.rand(n, n_features, generator=generator) * (torch.rand(n, n_features, generator=generator) < 0.1)
    return codes @ dictionary


def loss_before_and_after(sae, x: torch.Tensor, steps: int = 300, lr: float = 3e-3, **context) -> tuple[float, float]:
    """Full-batch Adam steps with the decoder-norm constraint (a no-op where the config has none)."""
    from jumpscope.sae import StepContext

    ctx = StepContext(**context)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    first = sae.loss(x, ctx).loss.item()
    for _ in range(steps):
        optimizer.zero_grad()
        sae.loss(x, ctx).loss.backward()
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        sae.normalize_decoder_rows()
    return first, sae.loss(x, ctx).loss.item()
