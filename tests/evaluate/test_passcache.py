"""The clean and ablation passes are computed once, kept, and reused on the same text."""

import logging

import pytest
import torch

from jumpscope.evaluate.downstream import spliced_measures
from jumpscope.evaluate.passcache import PassCache, text_digest
from jumpscope.models.sites import parse_site
from jumpscope.sae import build as build_sae
from tiny_models import build, ids_for

SITE = "layers.1.resid_post"


def setup(kind="causal_lm"):
    model, _ = build("llama" if kind == "causal_lm" else "bert")
    ids = ids_for(B=3)
    train = torch.ones_like(ids, dtype=torch.bool)
    train[:, 0] = False
    batches = [(ids[:2], train[:2]), (ids[2:], train[2:])]
    d = parse_site(SITE, model.base_model).d
    groups = {"a": {SITE: build_sae("jumprelu", d_in=d, d_sae=4 * d, seed=3)}}
    return model, batches, groups


def counting(model, monkeypatch):
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


def cache_for(tmp_path, model, batches, kind="causal_lm"):
    return PassCache(tmp_path, "tiny", model, kind, text_digest(batches))


@pytest.mark.parametrize("kind", ["causal_lm", "encoder"])
def test_cached_passes_give_the_recomputed_measures(tmp_path, monkeypatch, kind):
    model, batches, groups = setup(kind)
    plain = spliced_measures(model, kind, batches, groups)
    calls = counting(model, monkeypatch)
    first = spliced_measures(model, kind, batches, groups, cache=cache_for(tmp_path, model, batches, kind))
    computed = len(calls)
    assert len(list(tmp_path.glob("clean-*.safetensors"))) == 1
    assert len(list(tmp_path.glob("ablation-*.safetensors"))) == 2
    calls.clear()
    again = spliced_measures(model, kind, batches, groups, cache=cache_for(tmp_path, model, batches, kind))
    # the second call runs the spliced passes only (and, for a causal LM, the two short passes
    # checking that the LM head alone gives the logits)
    assert len(calls) == len(batches) + 2 * (kind == "causal_lm") < computed
    assert again == first
    for key, value in plain["a"].items():
        assert first["a"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_other_text_other_weights_or_other_sites_do_not_share(tmp_path):
    model, batches, groups = setup()
    spliced_measures(model, "causal_lm", batches, groups, cache=cache_for(tmp_path, model, batches))
    other_text = [(ids.flip(1), train) for ids, train in batches]
    spliced_measures(model, "causal_lm", other_text, groups, cache=cache_for(tmp_path, model, other_text))
    assert len(list(tmp_path.glob("clean-*"))) == 2
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    spliced_measures(model, "causal_lm", batches, groups, cache=cache_for(tmp_path, model, batches))
    assert len(list(tmp_path.glob("clean-*"))) == 3
    site = "layers.2.resid_post"
    d = parse_site(site, model.base_model).d
    spliced_measures(model, "causal_lm", batches, {"b": {site: build_sae("relu", d_in=d, d_sae=8)}},
                     ablations=("zero",), cache=cache_for(tmp_path, model, batches))
    assert len(list(tmp_path.glob("clean-*"))) == 3 and len(list(tmp_path.glob("ablation-*"))) == 7


@pytest.mark.parametrize("damage", ["truncate", "garbage", "swap"])
def test_a_corrupt_or_mismatched_cache_is_recomputed(tmp_path, caplog, damage):
    model, batches, groups = setup()
    first = spliced_measures(model, "causal_lm", batches, groups, cache=cache_for(tmp_path, model, batches))
    clean = next(tmp_path.glob("clean-*"))
    ablation = sorted(tmp_path.glob("ablation-*"))
    if damage == "truncate":
        clean.write_bytes(clean.read_bytes()[:100])
    elif damage == "garbage":
        clean.write_bytes(b"\0" * 64)
    else:  # one ablation's file under the other's name: its recorded key does not match
        ablation[0].write_bytes(ablation[1].read_bytes())
    with caplog.at_level(logging.WARNING):
        again = spliced_measures(model, "causal_lm", batches, groups, cache=cache_for(tmp_path, model, batches))
    assert again["a"] == pytest.approx(first["a"], rel=1e-6)
    assert any("ignoring the evaluation cache" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # rewritten: the next read is clean
        spliced_measures(model, "causal_lm", batches, groups, cache=cache_for(tmp_path, model, batches))
    assert not any("ignoring the evaluation cache" in r.getMessage() for r in caplog.records)
