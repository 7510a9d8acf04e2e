"""Dropping norm outliers (massive-activation positions) from training activations, and counting them."""

from collections import Counter

import pytest
import torch

from jumpscope.activations import ActivationConfig, ActivationSource
from jumpscope.activations.source import drop_outliers
from jumpscope.errors import ConfigError
from jumpscope.models.loading import load_model
from tiny_causal_lm import write_corpus, write_tiny_causal_lm

SITE = "layers.1.resid_post"


def test_planted_massive_rows_are_dropped_from_every_site_and_counted():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 8, generator=g), torch.randn(64, 4, generator=g)
    a[5] *= 200  # an attention-sink-like row at one site
    b[9] *= 200  # and another at the other site: rows stay aligned across sites
    counts = Counter()
    out = list(drop_outliers([{"a": a, "b": b}, {"a": a[:10], "b": b[:10]}], 10.0, counts))
    keep = torch.ones(64, dtype=torch.bool)
    keep[[5, 9]] = False
    assert torch.equal(out[0]["a"], a[keep]) and torch.equal(out[0]["b"], b[keep])
    assert out[1]["a"].shape[0] == 8
    assert counts == Counter(rows=74, dropped=4)


def test_source_drops_planted_outliers_from_training_only(tmp_path, monkeypatch):
    import jumpscope.activations.source as source_module

    model = write_tiny_causal_lm(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus.txt")
    loaded = load_model(str(model))
    real = source_module.harvest

    def planted(*args, **kwargs):  # a massive activation at the first row of every chunk
        for chunk in real(*args, **kwargs):
            yield {site: torch.cat([x[:1] * 1000, x[1:]]) for site, x in chunk.items()}

    monkeypatch.setattr(source_module, "harvest", planted)
    cfg = dict(model=str(model), corpus=str(corpus), context_size=32, model_batch_size=4)
    source = ActivationSource(ActivationConfig(**cfg), [SITE], loaded=loaded)
    chunks = list(source.chunks("train"))
    assert source.outliers["dropped"] == len(chunks) and source.outliers["rows"] == sum(
        c[SITE].shape[0] for c in chunks) + len(chunks)
    manifest = source.manifest()
    assert manifest["outliers_dropped"] == len(chunks) and manifest["outlier_norm_factor"] == 10.0
    assert max(c[SITE].norm(dim=-1).max() for c in chunks) < 1000 * 0.1  # the planted rows are gone
    heldout = list(source.chunks("heldout"))  # evaluation keeps every token
    assert all(c[SITE][0].norm() > 100 * c[SITE][1:].norm(dim=-1).median() for c in heldout)
    off = ActivationSource(ActivationConfig(**cfg, outlier_norm_factor=0), [SITE], loaded=loaded)
    assert sum(c[SITE].shape[0] for c in off.chunks("train")) == source.outliers["rows"]
    assert off.outliers["dropped"] == 0


@pytest.mark.parametrize("factor", [-1.0, 0.5, 1.0, float("inf"), float("nan")])
def test_outlier_factor_is_checked(factor):
    with pytest.raises(ConfigError, match="outlier_norm_factor"):
        ActivationConfig(outlier_norm_factor=factor)
