"""Streaming metrics equal the whole-sample SPEC 3 formulas, computed independently in numpy."""

import numpy as np
import pytest
import torch

from jumpscope.sae.metrics import StreamingMetrics
from jumpscope.sae.step import SparseActs


def numpy_metrics(x, x_hat, f):
    err = ((x - x_hat) ** 2).sum(-1)
    freq = (f > 0).mean(0)
    cos = (x * x_hat).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(x_hat, axis=-1))
    return {"l0": (f > 0).sum(-1).mean(), "fvu": err.mean() / ((x - x.mean(0)) ** 2).sum(-1).mean(),
            "mse": ((x - x_hat) ** 2).mean(), "cosine": cos.mean(), "dead_fraction": (freq == 0).mean(),
            "dense_fraction": (freq > 0.1).mean(), "freq": freq}


def test_streaming_equals_whole_sample_for_any_split():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 5)) + 3.0
    x_hat = x + 0.3 * rng.normal(size=x.shape)
    f = rng.exponential(size=(1000, 12)) * (rng.random((1000, 12)) < np.linspace(0, 0.4, 12))
    expected = numpy_metrics(x, x_hat, f)
    metrics = StreamingMetrics(d_sae=12, d_out=5)
    for start, stop in ((0, 1), (1, 377), (377, 999), (999, 1000)):
        metrics.update(torch.tensor(x[start:stop], dtype=torch.float32),
                       torch.tensor(x_hat[start:stop], dtype=torch.float32),
                       torch.tensor(f[start:stop], dtype=torch.float32))
    result = metrics.compute()
    for key in ("l0", "fvu", "mse", "cosine", "dead_fraction", "dense_fraction"):
        assert result[key] == pytest.approx(expected[key], rel=1e-5), key
    assert result["n_tokens"] == 1000
    histogram = result["density_histogram"]
    live = expected["freq"][expected["freq"] > 0]
    assert histogram["dead"] == int((expected["freq"] == 0).sum()) == 1
    assert sum(histogram["counts"]) == len(live)
    edges = np.array(histogram["log10_frequency_edges"])
    assert histogram["counts"] == np.histogram(np.log10(live), bins=edges)[0].tolist()


def test_state_round_trip_and_empty_error():
    metrics = StreamingMetrics(d_sae=3, d_out=2)
    with pytest.raises(ValueError, match="no tokens"):
        metrics.compute()
    metrics.update(torch.randn(10, 2), torch.randn(10, 2), torch.rand(10, 3))
    copy = StreamingMetrics(d_sae=3, d_out=2)
    copy.load_state_dict(metrics.state_dict())
    assert copy.compute() == metrics.compute()


def test_only_positive_acts_fire_and_counts_are_exact():
    acts = torch.tensor([[0.0, -2.0, 1e-30, 5.0], [-0.0, 3.0, 0.0, float("-inf")], [7.0, 0.5, 2.0, 1e30]])
    metrics = StreamingMetrics(d_sae=4, d_out=2)
    for _ in range(3):
        metrics.update(torch.ones(3, 2), torch.ones(3, 2), acts)
    assert metrics.firing_counts.tolist() == [3, 6, 6, 6]  # (acts > 0) summed over rows, three times
    assert metrics.compute()["l0"] == pytest.approx(7 / 3)


def test_acts_given_as_sparse_entries_count_like_the_dense_tensor():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5))
    x_hat = x + 0.3 * rng.normal(size=x.shape)
    f = rng.exponential(size=(300, 12)) * (rng.random((300, 12)) < np.linspace(0, 0.4, 12))
    expected = numpy_metrics(x, x_hat, f)
    dense = torch.tensor(f, dtype=torch.float32)
    flat = torch.arange(dense.numel())[dense.reshape(-1) > 0]
    # the entries a kernel hands over may include silent ones (value 0): add a few
    silent = torch.arange(dense.numel())[dense.reshape(-1) == 0][:50]
    flat = torch.cat([flat, silent]).sort().values
    metrics = StreamingMetrics(d_sae=12, d_out=5)
    metrics.update(torch.tensor(x, dtype=torch.float32), torch.tensor(x_hat, dtype=torch.float32),
                   SparseActs(flat, flat % 12, dense.reshape(-1)[flat], (300, 12)))
    result = metrics.compute()
    assert result["l0"] == pytest.approx(expected["l0"], rel=1e-12)
    assert result["dead_fraction"] == pytest.approx(expected["dead_fraction"])
    assert result["dense_fraction"] == pytest.approx(expected["dense_fraction"])
