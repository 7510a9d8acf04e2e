"""Measuring steering: concept rates, the continuation loss, and the random-direction control."""

import math

import pytest
import torch

from jumpscope.models.loading import load_model
from jumpscope.sae import build as build_sae
from jumpscope.steer import (Steer, SteerDirection, compare_generations, concept_rate, continuation_loss,
                             random_control)
from jumpscope.steer.interventions import site_transform, steering_vector
from tiny_causal_lm import write_tiny_causal_lm

SITE = "layers.1.resid_post"


def test_concept_rate_counts_whole_words_in_any_case():
    texts = ["The Cat sat.", "cats concatenate", "a cat, a CAT! ice  cream", ""]
    rate = concept_rate(texts, ["cat", "ice cream", " "])
    assert (rate.texts, rate.with_concept, rate.hits) == (4, 2, 3)  # "ice  cream" has two spaces: no match
    assert rate.words == 3 + 2 + 6 and rate.fraction == 0.5 and rate.per_token is None
    assert concept_rate(texts, ["ice  cream"]).hits == 1 and concept_rate(texts, ["cats"]).hits == 1
    assert concept_rate(["x"], ["x"], tokens=4).per_token == 0.25
    with pytest.raises(ValueError, match="no concept words"):
        concept_rate(texts, [" ", ""])
    with pytest.raises(TypeError):
        concept_rate("one text", ["cat"])


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(str(write_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "model")))


def test_continuation_loss_is_the_mean_nll_of_the_continuation(loaded):
    prompt, continuation = [1, 100, 101], [102, 40, 103, 104]
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logp = loaded.model(ids).logits[0].log_softmax(-1)
    by_hand = -sum(float(logp[len(prompt) - 1 + j, token]) for j, token in enumerate(continuation)) / 4
    assert continuation_loss(loaded, None, prompt, continuation) == pytest.approx(by_hand, rel=1e-5)
    assert continuation_loss(loaded, None, torch.tensor([prompt]), torch.tensor(continuation)) == \
        pytest.approx(by_hand, rel=1e-5)
    assert math.isnan(continuation_loss(loaded, None, prompt, []))


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_random_control_matches_the_steering_norm_and_is_seeded(arch):
    sae = build_sae(arch, d_in=32, d_sae=16, k=4, seed=0) if arch == "topk" else build_sae(arch, d_in=32, d_sae=16)
    with torch.no_grad():
        sae.W_dec[5] *= 3.7  # rows need not have unit norm (ReLU SAEs are not normalised)
    steer = Steer(5, -2.5)
    control = random_control(sae, steer, seed=1)
    assert isinstance(control, SteerDirection) and control.alpha == steer.alpha
    assert float(steering_vector(sae, [control]).norm()) == pytest.approx(float(steering_vector(sae, [steer]).norm()),
                                                                          rel=1e-5)
    assert torch.equal(control.vector, random_control(sae, steer, seed=1).vector)
    assert not torch.allclose(control.vector, random_control(sae, steer, seed=2).vector)
    cosine = torch.nn.functional.cosine_similarity(control.vector, sae.W_dec[5].detach(), dim=0)
    assert abs(float(cosine)) < 0.9
    x = torch.randn(3, 32)
    assert torch.allclose(site_transform(sae, [control])(x), x - 2.5 * control.vector, atol=1e-6)


def test_compare_generations_shares_seeds_and_scores_under_the_plain_model(loaded):
    sae = build_sae("topk", d_in=32, d_sae=16, k=4, seed=0).eval()
    conditions = {"unsteered": ("none", None), "steered": ("steer", {SITE: (sae, [Steer(2, 40.0)])}),
                  "again": ("none", None)}
    out = compare_generations(loaded, None, ["hello abc", "bell"], conditions, ["hello"], samples=2,
                              temperature=1.0, max_new_tokens=6, seed=3)
    assert [g.seed for g in out["unsteered"].generations] == [3, 4, 3, 4]
    assert [g.text for g in out["unsteered"].generations] == [g.text for g in out["again"].generations]
    first = out["steered"].generations[0]
    assert first.tokens == 6 and out["steered"].rate.texts == 4 and out["steered"].rate.tokens == 24
    assert math.isfinite(first.loss) and out["steered"].loss != out["unsteered"].loss
    with pytest.raises(ValueError, match="temperature > 0"):
        compare_generations(loaded, None, ["hi"], conditions, ["hello"], samples=2)
