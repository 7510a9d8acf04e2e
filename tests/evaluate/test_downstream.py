"""The model's own measures with SAEs spliced in: delta LM loss, KL, CE loss recovered, embedding distance."""

import math

import pytest
import torch
import transformers as tf

from jumpscope.evaluate.downstream import downstream, site_means, spliced_measures
from jumpscope.models.sites import parse_site
from jumpscope.sae import build as build_sae
from jumpscope.sae.jumprelu import jumprelu_from_weights
from exact_saes import exact_sae, zero_sae
from tiny_models import V, build, ids_for

SITE = "layers.1.resid_post"


def batches_for(ids, bos=False):
    train = torch.ones_like(ids, dtype=torch.bool)
    if bos:
        train[:, 0] = False
    return [(ids, train)]


def constant_sae(value):
    """An SAE whose reconstruction is always ``value`` (no latent ever fires, b_dec = value)."""
    d = value.numel()
    return jumprelu_from_weights(torch.zeros(d, 4), torch.zeros(4, d), torch.zeros(4), value.clone(),
                                 torch.ones(4))


@pytest.mark.parametrize("name,kind,measure", [("llama", "causal_lm", "delta_lm_loss"),
                                               ("bert", "encoder", "embedding_1_minus_cosine")])
def test_exact_saes_cost_nothing_and_ablations_cost_something(name, kind, measure):
    model, _ = build(name, None if kind == "causal_lm" else tf.BertModel)
    batches = batches_for(ids_for(B=3))
    d = parse_site(SITE, model.base_model).d
    groups = {"exact": {SITE: exact_sae(d)}, "zero": {SITE: zero_sae(d)}}
    together = spliced_measures(model, kind, batches, groups)
    assert abs(together["exact"][measure]) < 1e-5
    assert together["zero"][measure] > 1e-3
    alone = downstream(model, kind, batches, groups["zero"])
    assert alone[measure] == pytest.approx(together["zero"][measure], rel=1e-6)
    recovered = "ce_loss_recovered" if kind == "causal_lm" else "embedding_recovered"
    # a perfect reconstruction recovers everything; the zero "SAE" is exactly the zero ablation
    assert together["exact"][f"{recovered}_zero"] == pytest.approx(1.0, abs=1e-4)
    assert together["exact"][f"{recovered}_mean"] == pytest.approx(1.0, abs=1e-4)
    assert together["zero"][f"{recovered}_zero"] == pytest.approx(0.0, abs=1e-6)
    if kind == "causal_lm":
        assert abs(together["exact"]["kl_div"]) < 1e-6 and together["zero"]["kl_div"] > 1e-3


def test_keep_error_splice_leaves_the_loss_unchanged():
    from lm_losses import next_token_losses
    from jumpscope.models.splice import splice

    model, _ = build("llama")
    ids, train = batches_for(ids_for(B=3), bos=True)[0]
    attention = torch.ones_like(train)
    d = parse_site(SITE, model.base_model).d
    random_sae = build_sae("jumprelu", d_in=d, d_sae=4 * d, seed=2)
    clean = next_token_losses(model, ids, train, attention)
    with splice(model, {SITE: random_sae}, keep_error=True, positions=train):
        kept = next_token_losses(model, ids, train, attention)
    with splice(model, {SITE: random_sae}, positions=train):
        replaced = next_token_losses(model, ids, train, attention)
    assert torch.allclose(kept, clean, atol=1e-5)
    assert (replaced - clean).abs().max() > 1e-3  # the replacement itself is lossy


def test_zero_ablating_the_last_residual_gives_the_uniform_loss():
    # RMSNorm(0) = 0 and the LM head has no bias, so the logits are all zero: CE = ln(vocab)
    model, _ = build("llama")
    last = f"layers.{model.config.num_hidden_layers - 1}.resid_post"
    d = parse_site(last, model.base_model).d
    result = spliced_measures(model, "causal_lm", batches_for(ids_for(B=3), bos=True),
                              {"exact": {last: exact_sae(d)}}, ablations=("zero",))["exact"]
    assert result["ce_zero_ablated"] == pytest.approx(math.log(V), abs=1e-5)
    assert abs(result["ce_clean"] - math.log(V)) > 1e-3  # the clean model is not uniform
    assert result["n_predictions"] == 3 * (ids_for().shape[1] - 2)  # BOS neither predicts nor is scored


def test_kl_and_losses_match_an_independent_computation():
    model, _ = build("llama")
    ids = ids_for(B=2)
    d = parse_site(SITE, model.base_model).d
    sae = build_sae("jumprelu", d_in=d, d_sae=4 * d, seed=5)
    result = downstream(model, "causal_lm", batches_for(ids), {SITE: sae}, ablations=())
    from jumpscope.models.splice import splice

    with torch.no_grad():
        clean = model(input_ids=ids).logits[:, :-1].reshape(-1, V)
        with splice(model, {SITE: sae}):
            spliced = model(input_ids=ids).logits[:, :-1].reshape(-1, V)
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=clean),
                                           torch.distributions.Categorical(logits=spliced)).mean()
    targets = ids[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(spliced, targets) - torch.nn.functional.cross_entropy(clean, targets)
    assert result["kl_div"] == pytest.approx(kl.item(), rel=1e-4)
    assert result["delta_lm_loss"] == pytest.approx(ce.item(), rel=1e-4)


def test_mean_ablation_uses_the_site_mean_over_ordinary_tokens():
    model, _ = build("llama")
    batches = batches_for(ids_for(B=3), bos=True)
    d = parse_site(SITE, model.base_model).d
    means = site_means(model, batches, [SITE])
    from jumpscope.models.harvest import harvest

    rows = torch.cat([chunk[SITE] for chunk in harvest(model, batches, [SITE])])
    assert torch.allclose(means[SITE], rows.mean(0), atol=1e-5)
    result = spliced_measures(model, "causal_lm", batches, {"mean": {SITE: constant_sae(means[SITE])}})["mean"]
    assert result["ce_loss_recovered_mean"] == pytest.approx(0.0, abs=1e-5)
    assert result["ce_mean_ablated"] != pytest.approx(result["ce_zero_ablated"], abs=1e-3)


def test_special_positions_keep_their_clean_activations():
    model, _ = build("llama")
    ids = ids_for(B=2)
    train = torch.ones_like(ids, dtype=torch.bool)
    train[:, 0] = False
    d = parse_site(SITE, model.base_model).d
    from jumpscope.models.harvest import Harvester
    from jumpscope.models.splice import splice

    clean = Harvester(model, [SITE]).activations(ids)[SITE]
    with splice(model, {SITE: zero_sae(d)}, positions=train):
        spliced = Harvester(model, [SITE]).activations(ids)[SITE]
    assert torch.equal(spliced[:, 0], clean[:, 0])
    assert torch.equal(spliced[:, 1:], torch.zeros_like(spliced[:, 1:]))
    with pytest.raises(ValueError, match="does not match the positions mask"):
        with splice(model, {SITE: zero_sae(d)}, positions=train[:, 1:]):
            model(input_ids=ids)


def test_delta_lm_loss_needs_a_language_model_head():
    model, _ = build("llama", tf.LlamaModel)
    with pytest.raises(ValueError, match="no language-model head"):
        downstream(model, "causal_lm", batches_for(ids_for()), {})


def test_unknown_ablation_is_refused():
    model, _ = build("llama")
    d = parse_site(SITE, model.base_model).d
    with pytest.raises(ValueError, match="unknown ablation 'half'"):
        spliced_measures(model, "causal_lm", batches_for(ids_for()), {"x": {SITE: exact_sae(d)}}, ablations=("half",))
