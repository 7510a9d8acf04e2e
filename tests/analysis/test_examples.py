"""Max-activating examples: streaming equals brute force, the sample is of firing contexts, the
histogram and density count what they should, resume is exact, bad input is refused."""

import pytest
import torch

from jumpscope.analysis import PAD_TOKEN, LatentExamples
from jumpscope.analysis.examples import ExampleCollector, ExamplesConfig, collect_examples, encode_windows
from jumpscope.models.harvest import Harvester
from jumpscope.sae import build
from tiny_models import V, build as build_model


def make_batches(n_batches=6, B=3, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, V, (B, T), generator=g)
        ids[:, 0] = 1  # BOS: never a candidate
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[:, 0] = False
        batches.append((ids, mask))
    return batches


def relu_sae(d_in, d_sae=24, seed=0):
    torch.manual_seed(seed)
    sae = build("relu", d_in=d_in, d_sae=d_sae, site="layers.1.resid_post")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random directions, thresholds spread so some latents fire rarely or never
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5)
        sae.b_enc.copy_(-torch.linspace(0.0, 0.08, d_sae))
    return sae


def brute_force(model, sae, batches):
    """Every (window, latent) peak over the whole corpus at once, plus every token's latents."""
    harvester = Harvester(model, [sae.cfg.site])
    windows, latents = [], []
    for ids, mask in batches:
        acts = encode_windows(sae, harvester.activations(ids)[sae.cfg.site], 1024)
        latents.append(acts.masked_fill(~mask[..., None], 0.0))
        windows.append(ids)
    return torch.cat(windows), torch.cat(latents)  # [W, T], [W, T, d_sae]


def window_matches(found, latent, slot, ids, latents, positions, window, cfg):
    """Whether example ``slot`` of ``latent`` is ``window``'s tokens and activations around its peak."""
    peak = int(positions[window, latent])
    for offset in range(cfg.width):
        t = peak - cfg.tokens_before + offset
        inside = 0 <= t < ids.shape[1]
        if int(found.top_tokens[latent, slot, offset]) != (int(ids[window, t]) if inside else PAD_TOKEN):
            return False
        want = float(latents[window, t, latent]) if inside else 0.0
        if abs(float(found.top_acts[latent, slot, offset]) - want) > 1e-6:
            return False
    return True


@pytest.fixture(scope="module")
def setup():
    model, _ = build_model("llama")
    sae = relu_sae(model.config.hidden_size)
    batches = make_batches()
    cfg = ExamplesConfig(n_top=4, n_sample=3, tokens_before=3, tokens_after=2, checkpoint_every=2)
    found = collect_examples(model, sae, batches, cfg, progress=False)
    return model, sae, batches, cfg, found, *brute_force(model, sae, batches)


def test_top_examples_equal_brute_force(setup):
    model, sae, batches, cfg, found, ids, latents = setup
    peaks, positions = latents.max(dim=1)  # [W, d_sae]
    checked = 0
    for latent in range(sae.cfg.d_sae):
        firing = (peaks[:, latent] > 0).nonzero().flatten()
        expected = peaks[firing, latent].sort(descending=True)
        n = min(cfg.n_top, firing.numel())
        torch.testing.assert_close(found.top_values[latent, :n], expected.values[:n])
        assert (found.top_values[latent, n:] == 0).all() and (found.top_tokens[latent, n:] == PAD_TOKEN).all()
        for slot in range(n):
            # causal models give equal peaks to windows with equal prefixes: any tied window will do
            tied = firing[peaks[firing, latent] == expected.values[slot]].tolist()
            assert any(window_matches(found, latent, slot, ids, latents, positions, window, cfg) for window in tied)
            assert float(found.top_acts[latent, slot, cfg.tokens_before]) == pytest.approx(
                float(found.top_values[latent, slot]))
            checked += 1
    assert checked > sae.cfg.d_sae  # the comparison covered real examples, not only empty slots


def test_density_histogram_and_sample(setup):
    model, sae, batches, cfg, found, ids, latents = setup
    mask = torch.cat([m for _, m in batches])
    assert found.n_tokens == int(mask.sum())
    fired = (latents > 0).sum(dim=(0, 1))
    assert torch.equal(found.fire_count, fired)
    assert torch.equal(found.hist_counts.sum(dim=1), fired)
    # one latent's histogram by hand, with numpy-independent edges: log10 values into [lo, hi) bins
    latent = int(fired.argmax())
    values = latents[..., latent][latents[..., latent] > 0].log10()
    edges = found.hist_edges
    by_hand = torch.zeros(cfg.hist_bins, dtype=torch.int64)
    for v in values.tolist():
        by_hand[min(max(int((v - float(edges[0])) // float(edges[1] - edges[0])), 0), cfg.hist_bins - 1)] += 1
    assert torch.equal(found.hist_counts[latent], by_hand)
    # the sample: peaks of distinct windows where the latent fired, sorted, no more than exist
    peaks = latents.max(dim=1).values
    for latent in range(sae.cfg.d_sae):
        firing = peaks[:, latent][peaks[:, latent] > 0]
        n = min(cfg.n_sample, firing.numel())
        got = found.sample_values[latent, :n]
        assert (got[:-1] >= got[1:]).all() if n > 1 else True
        assert (found.sample_values[latent, n:] == 0).all()
        for value in got.tolist():
            assert torch.isclose(firing, torch.tensor(value)).any()
        assert len(set(got.tolist())) == n  # no window twice


def test_sample_is_uniform_over_firing_windows():
    """A latent firing in every window: each window is kept about n_sample / n_windows of the time."""
    cfg = ExamplesConfig(n_top=1, n_sample=2, tokens_before=0, tokens_after=0, hist_bins=2)
    counts = torch.zeros(10)
    for seed in range(300):
        collector = ExampleCollector(1, ExamplesConfig(**{**cfg.__dict__, "seed": seed}))
        for window in range(10):  # one window per batch, the latent's peak identifies the window
            collector.add(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                          torch.full((1, 1, 1), float(window + 1)))
        for value in collector.result().sample_values[0].tolist():
            counts[int(value) - 1] += 1
    expected = 300 * 2 / 10
    assert ((counts - expected).abs() < 4 * (expected * 0.8) ** 0.5).all(), counts  # ~4 sigma, binomial


def test_resume_is_exact(setup, tmp_path):
    model, sae, batches, cfg, found, *_ = setup

    class Interrupt(Exception):
        pass

    def interrupted():
        for index, batch in enumerate(batches):
            if index == 5:
                raise Interrupt
            yield batch

    with pytest.raises(Interrupt):
        collect_examples(model, sae, interrupted(), cfg, state_dir=tmp_path, progress=False)
    resumed = collect_examples(model, sae, batches, cfg, state_dir=tmp_path, resume=True, progress=False)
    for name in ("top_values", "top_tokens", "top_acts", "sample_values", "sample_tokens", "fire_count",
                 "hist_counts", "random_tokens", "random_peaks"):
        assert torch.equal(getattr(resumed, name), getattr(found, name)), name
    assert resumed.n_tokens == found.n_tokens


def test_save_load_roundtrip_and_corrupt_file(setup, tmp_path):
    found = setup[4]
    found.save(tmp_path / "ex")
    back = LatentExamples.load(tmp_path / "ex")
    assert torch.equal(back.top_tokens, found.top_tokens) and back.n_tokens == found.n_tokens
    path = tmp_path / "ex" / "examples.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or not a valid safetensors"):
        LatentExamples.load(tmp_path / "ex")


def test_max_tokens_and_bad_inputs(setup):
    model, sae, batches, cfg, *_ = setup
    few = collect_examples(model, sae, batches, cfg, max_tokens=40, progress=False)
    assert 40 <= few.n_tokens < 40 + 3 * 11  # stops after the batch that crosses the limit
    wrong = build("relu", d_in=model.config.hidden_size + 1, d_sae=8, site="layers.1.resid_post")
    with pytest.raises(ValueError, match="width"):
        collect_examples(model, wrong, batches, cfg, progress=False)
    with pytest.raises(ValueError, match="unknown|site"):
        collect_examples(model, build("relu", d_in=32, d_sae=8, site="layers.1.nowhere"), batches, cfg,
                         progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        collect_examples(model, sae, [], cfg, progress=False)
    with pytest.raises(ValueError, match="n_top"):
        ExamplesConfig(n_top=0)


def test_merging_window_by_window_finds_the_same_top_examples(setup):
    """token_chunk below a batch's size merges one window at a time: same top examples, same counts."""
    model, sae, batches, cfg, found, *_ = setup
    small = ExamplesConfig(**{**cfg.__dict__, "token_chunk": 12})  # one 12-token window per merge
    stepwise = collect_examples(model, sae, batches, small, progress=False)
    for name in ("top_values", "top_tokens", "fire_count", "hist_counts"):
        assert torch.equal(getattr(stepwise, name), getattr(found, name)), name


def test_random_windows_hold_every_latents_peak_over_their_tokens(setup):
    """Each kept random window is some corpus window's tokens around a counted position, and its
    peaks are every latent's brute-force maximum over the counted tokens there (0: did not fire)."""
    _, _, batches, cfg, found, ids, latents = setup
    n_windows = ids.shape[0]
    assert found.random_tokens.shape == (min(cfg.n_random, n_windows), cfg.width)
    assert found.random_peaks.shape == (found.random_tokens.shape[0], latents.shape[-1])
    T = ids.shape[1]
    for tokens, peaks in zip(found.random_tokens, found.random_peaks):
        matches = []
        for window in range(n_windows):
            for centre in range(1, T):  # position 0 (BOS) is never counted
                around = torch.arange(centre - cfg.tokens_before, centre + cfg.tokens_after + 1)
                inside = (around >= 0) & (around < T)
                want = torch.where(inside, ids[window, around.clamp(0, T - 1)], torch.tensor(PAD_TOKEN))
                if torch.equal(want.to(torch.int32), tokens):
                    expected = latents[window, around[inside]].amax(dim=0).clamp(min=0)
                    matches.append(torch.allclose(peaks, expected, atol=1e-6))
        assert any(matches)
    assert (found.random_peaks == 0).any() and (found.random_peaks > 0).any()  # both kinds of context exist
