"""The model's own measures with SAEs spliced in: zero for exact SAEs, positive for ablations."""

import pytest
import torch

from jumpscope.evaluate.downstream import downstream, downstream_each
from jumpscope.models.sites import parse_site
from test_splice import exact_sae, zero_sae
from tiny_models import build, ids_for


@pytest.mark.parametrize("name,kind,measure", [("llama", "causal_lm", "delta_lm_loss"),
                                               ("bert", "encoder", "embedding_1_minus_cosine")])
def test_exact_saes_cost_nothing_and_ablations_cost_something(name, kind, measure):
    cls = None if kind == "causal_lm" else __import__("transformers").BertModel
    model, _ = build(name, cls)
    ids = ids_for(B=3)
    batches = [(ids, torch.ones_like(ids, dtype=torch.bool))]
    d = parse_site("layers.1.resid_post", model.base_model).d
    groups = {"exact": {"layers.1.resid_post": exact_sae(d)}, "zero": {"layers.1.resid_post": zero_sae(d)}}
    together = downstream_each(model, kind, batches, groups)
    assert abs(together["exact"][measure]) < 1e-5
    assert together["zero"][measure] > 1e-3
    alone = downstream(model, kind, batches, groups["zero"])
    assert alone[measure] == pytest.approx(together["zero"][measure], rel=1e-6)


def test_delta_lm_loss_needs_a_language_model_head():
    model, _ = build("llama", __import__("transformers").LlamaModel)
    ids = ids_for()
    with pytest.raises(ValueError, match="no language-model head"):
        downstream(model, "causal_lm", [(ids, torch.ones_like(ids, dtype=torch.bool))], {})
