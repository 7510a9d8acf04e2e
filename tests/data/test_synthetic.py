"""Synthetic ground-truth activations: determinism, sparsity statistics, correlated groups,
offset and noise, and the feature-recovery score."""

from __future__ import annotations

import math

import pytest
import torch

from jumpscope.data.synthetic import SyntheticActivations, SyntheticConfig, feature_recovery

N_SAMPLE = 40_000


def codes_of(source: SyntheticActivations, n: int = N_SAMPLE, seed: int = 123) -> torch.Tensor:
    return source.sample_codes(n, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def source() -> SyntheticActivations:
    return SyntheticActivations(SyntheticConfig(d_in=32, n_features=256, true_l0=6.0, n_groups=12, group_size=4,
                                                cofire_probability=0.7, seed=5))


@pytest.fixture(scope="module")
def active(source: SyntheticActivations) -> torch.Tensor:
    return codes_of(source) > 0


# -- determinism -------------------------------------------------------------------------------

def test_same_seed_same_structure_and_batches():
    a, b = SyntheticActivations(seed=3), SyntheticActivations(SyntheticConfig(seed=3))
    for name in ("dictionary", "base_probabilities", "firing_probabilities", "leaders", "members", "offset",
                 "magnitude_scales"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert all(torch.equal(x, y) for x, y in zip(a.batches(64, 5, seed=1), b.batches(64, 5, seed=1)))


def test_different_seeds_differ():
    a, b = SyntheticActivations(seed=3), SyntheticActivations(seed=4)
    assert not torch.equal(a.dictionary, b.dictionary)
    first = next(iter(a.batches(64, 1, seed=0)))
    assert not torch.equal(first, next(iter(a.batches(64, 1, seed=1))))
    assert not torch.equal(first, next(iter(b.batches(64, 1, seed=0))))


def test_stream_is_replayable_and_randomly_accessible():
    source = SyntheticActivations(d_in=16, n_features=64, true_l0=3.0, n_groups=4)
    stream = source.batches(batch_size=32, n_batches=6, seed=9)
    assert len(stream) == 6
    iterator = iter(stream)
    consumed = [next(iterator) for _ in range(3)]  # a partial pass does not move the stream
    full = list(stream)
    assert len(full) == 6
    for index, batch in enumerate(full):
        assert batch.dtype == torch.float32 and batch.shape == (32, 16)
        assert torch.equal(batch, source.batch(index, 32, seed=9))
    assert all(torch.equal(x, y) for x, y in zip(consumed, full))
    assert len(set(tuple(b[0, :3].tolist()) for b in full)) == 6  # the batches are not repeats


def test_endless_stream():
    stream = SyntheticActivations(d_in=8, n_features=16, true_l0=2.0, n_groups=0).batches(4, None)
    iterator = iter(stream)
    assert all(next(iterator).shape == (4, 8) for _ in range(50))
    with pytest.raises(TypeError):
        len(stream)


# -- statistics -------------------------------------------------------------------------------

def test_dictionary_is_unit_norm_and_overcomplete(source):
    d = source.dictionary
    assert d.shape == (256, 32) and d.dtype == torch.float32
    torch.testing.assert_close(d.norm(dim=1), torch.ones(256))
    assert torch.linalg.matrix_rank(d.double()) == 32  # spans the space, so rows cannot be orthogonal


def test_expected_l0_is_the_configured_one(source):
    assert source.expected_l0 == pytest.approx(6.0, rel=1e-6)
    assert source.firing_probabilities.max() <= 1.0 and source.base_probabilities.max() <= 0.5 + 1e-7


def test_empirical_l0_matches_true_l0(active):
    counts = active.sum(1).double()
    # The mean of N i.i.d. counts is within a few standard errors of its expectation.
    standard_error = counts.std().item() / math.sqrt(counts.numel())
    assert abs(counts.mean().item() - 6.0) < 4 * standard_error


def test_empirical_firing_frequencies_match_marginals(source, active):
    p = source.firing_probabilities.double()
    freq = active.double().mean(0)
    z = (freq - p) / (p * (1 - p) / active.shape[0]).sqrt()
    assert z.abs().max() < 5.5  # 256 binomial z-scores; the largest of 256 normals is rarely > 4


def test_firing_probabilities_follow_a_power_law():
    source = SyntheticActivations(n_features=400, true_l0=2.0, zipf_exponent=1.2, n_groups=0,
                                  max_firing_probability=1.0)
    assert source.base_probabilities.max() < 1.0  # nothing capped
    p = source.base_probabilities.double().sort(descending=True).values
    ranks = torch.arange(1, 401, dtype=torch.float64)
    slope = torch.linalg.lstsq(torch.stack([ranks.log(), torch.ones(400, dtype=torch.float64)], 1),
                               p.log()[:, None]).solution[0].item()
    assert slope == pytest.approx(-1.2, abs=1e-6)
    assert p[0] / p[-1] > 100  # some features are far rarer than others


def test_capped_probabilities_still_give_true_l0():
    source = SyntheticActivations(n_features=64, true_l0=10.0, zipf_exponent=2.0, max_firing_probability=0.3,
                                  n_groups=2)
    assert source.base_probabilities.max() == pytest.approx(0.3)
    assert source.expected_l0 == pytest.approx(10.0, rel=1e-6)
    with pytest.raises(ValueError, match="unreachable"):
        SyntheticActivations(n_features=64, true_l0=50.0, max_firing_probability=0.5)


def test_groups_co_fire(source, active):
    c = source.cfg.cofire_probability
    leaders, members = source.leaders, source.members
    assert len(set(leaders.tolist()) | set(members.reshape(-1).tolist())) == leaders.numel() + members.numel()
    lead_on = active[:, leaders].double()  # (N, G)
    n_lead = lead_on.sum(0)  # (G,)
    joint = torch.einsum("ng,ngm->gm", lead_on, active[:, members].double())  # (G, S-1)
    # Pooled P(member | leader): expected c + (1 - c) * b_member per pair, weighted by leader firings.
    expected = ((c + (1 - c) * source.base_probabilities[members].double()) * n_lead[:, None]).sum()
    trials = n_lead.sum() * members.shape[1]
    rate, expected_rate = joint.sum() / trials, expected / trials
    assert abs(rate - expected_rate) < 5 * math.sqrt(expected_rate * (1 - expected_rate) / trials)

    # Control: features in no group fire as often with a leader on as overall (independence).
    grouped = set(leaders.tolist()) | set(members.reshape(-1).tolist())
    free = torch.tensor([i for i in range(source.cfg.n_features) if i not in grouped])
    control_joint = lead_on.T @ active[:, free].double()  # (G, n_free)
    control_rate = control_joint.sum() / (n_lead.sum() * free.numel())
    marginal = active[:, free].double().mean()
    assert abs(control_rate - marginal) < 5 * math.sqrt(marginal / (n_lead.sum() * free.numel()))
    member_marginal = active[:, members].double().mean()
    assert rate > 5 * member_marginal and rate > 0.5  # members are far likelier with their leader on


def test_no_groups_means_independent_features():
    source = SyntheticActivations(d_in=16, n_features=32, true_l0=4.0, n_groups=0, zipf_exponent=0.0)
    assert torch.allclose(source.firing_probabilities, torch.full((32,), 4.0 / 32))
    active = codes_of(source, 20_000).double()
    corr = torch.corrcoef(active.T)
    off_diagonal = corr[~torch.eye(32, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 6 / math.sqrt(20_000)  # correlation standard error 1/sqrt(N)


@pytest.mark.parametrize("distribution", ["exponential", "half_normal", "uniform"])
def test_magnitudes_are_positive_with_mean_one(distribution):
    source = SyntheticActivations(d_in=16, n_features=64, true_l0=8.0, n_groups=0, magnitude_distribution=distribution)
    codes = codes_of(source, 10_000)
    values = codes[codes > 0].double()
    assert (codes >= 0).all()
    assert abs(values.mean().item() - 1.0) < 5 * values.std().item() / math.sqrt(values.numel())


def test_vectors_are_codes_times_dictionary_plus_offset_and_noise():
    source = SyntheticActivations(d_in=24, n_features=96, true_l0=4.0, mean_offset_norm=3.0, noise_std=0.05)
    assert source.offset.norm().item() == pytest.approx(3.0, rel=1e-5)
    x, codes = source.sample(20_000, torch.Generator().manual_seed(0), return_codes=True)
    x_again = source.sample(20_000, torch.Generator().manual_seed(0))
    assert torch.equal(x, x_again)
    residual = x - codes @ source.dictionary - source.offset
    assert residual.std().item() == pytest.approx(0.05, rel=0.02)
    assert residual.mean(0).abs().max() < 5 * 0.05 / math.sqrt(20_000)
    clean = SyntheticActivations(d_in=24, n_features=96, true_l0=4.0)
    x, codes = clean.sample(100, torch.Generator().manual_seed(0), return_codes=True)
    torch.testing.assert_close(x, codes @ clean.dictionary)


@pytest.mark.parametrize("fields", [dict(d_in=0), dict(true_l0=0), dict(n_groups=200, group_size=4),
                                    dict(group_size=1), dict(cofire_probability=1.5),
                                    dict(magnitude_distribution="gamma"), dict(noise_std=-1)])
def test_config_validation(fields):
    with pytest.raises(ValueError):
        SyntheticConfig(**fields)


# -- feature recovery -----------------------------------------------------------------------------

def test_recovery_of_the_dictionary_itself_is_perfect(source):
    score = feature_recovery(source.dictionary, source.dictionary)
    assert score["mean_max_cos"] == pytest.approx(1.0, abs=1e-6)
    assert score["frac_above_0.9"] == 1.0 and score["frac_above_0.8"] == 1.0
    assert score["per_feature_max_cos"].shape == (256,)


def test_recovery_is_invariant_to_permutation_and_positive_scale(source):
    g = torch.Generator().manual_seed(0)
    noisy = source.dictionary + 0.15 * torch.randn(source.dictionary.shape, generator=g)
    base = feature_recovery(noisy, source.dictionary)
    assert 0.5 < base["mean_max_cos"] < 1.0  # a partly correct dictionary scores in between
    scaled = noisy[torch.randperm(256, generator=g)] * (0.1 + 10 * torch.rand(256, 1, generator=g))
    moved = feature_recovery(scaled, source.dictionary)
    for key in ("mean_max_cos", "frac_above_0.9", "frac_above_0.8"):
        assert moved[key] == pytest.approx(base[key], abs=1e-9)
    # Extra rows never lower the score; flipped rows do not count (codes are nonnegative).
    wider = torch.cat([torch.randn(100, 32, generator=g), source.dictionary])
    assert feature_recovery(wider, source.dictionary)["mean_max_cos"] == pytest.approx(1.0, abs=1e-6)
    assert feature_recovery(-source.dictionary, source.dictionary)["frac_above_0.8"] == 0.0


def test_recovery_of_random_rows_is_poor(source):
    random_rows = torch.randn(512, 32, generator=torch.Generator().manual_seed(1))
    score = feature_recovery(random_rows, source.dictionary)
    # A random unit vector in 32 dims has cosine ~ N(0, 1/32) with a fixed direction: the best of
    # 512 is around sqrt(2 ln 512 / 32) ~ 0.6, and > 0.8 has probability ~ 512 * 1e-6.
    assert score["mean_max_cos"] < 0.75
    assert score["frac_above_0.8"] == 0.0 and score["frac_above_0.9"] == 0.0


def test_recovery_counts_the_fraction_of_recovered_features(source):
    half = source.dictionary[:128]
    score = feature_recovery(half, source.dictionary)
    assert score["frac_above_0.9"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        feature_recovery(torch.zeros(4, 31), source.dictionary)


# -- end to end ---------------------------------------------------------------------------------

def test_a_trained_sae_recovers_an_easy_dictionary():
    """The benchmark's premise: the trainer on a synthetic stream learns the true directions.
    24 features in 16 dims, 2 active, no noise: a TopK SAE (lr raised for the few steps) must
    find almost all of them, far above what its random initialisation scores."""
    from jumpscope.sae import build
    from jumpscope.train import Trainer, TrainerConfig

    source = SyntheticActivations(d_in=16, n_features=24, true_l0=2.0, zipf_exponent=0.0, n_groups=0, seed=1)
    sae = build("topk", d_in=16, d_sae=48, k=2, lr=3e-3, seed=1)
    before = feature_recovery(sae.W_dec.detach().clone(), source.dictionary)
    Trainer({"topk": sae}, TrainerConfig(total_tokens=120_000, batch_size=64, progress=False, device="cpu",
                                         checkpoint_every=0)).fit(source.batches(64, None, seed=1))
    after = feature_recovery(sae.W_dec.detach(), source.dictionary)
    assert before["frac_above_0.9"] == 0.0 and before["mean_max_cos"] < 0.7
    assert after["frac_above_0.9"] >= 0.9 and after["mean_max_cos"] > 0.95
