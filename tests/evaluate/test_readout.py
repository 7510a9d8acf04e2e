"""Losses and KL a chunk of positions at a time: the same numbers, bounded memory."""

import logging

import pytest
import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode

from jumpscope.evaluate.downstream import spliced_measures
from jumpscope.evaluate.readout import chunk_positions, head_reproduces_logits
from jumpscope.models.sites import parse_site
from jumpscope.sae import build as build_sae
from tiny_models import V, build, ids_for

SITE = "layers.1.resid_post"
KEYS = ("ce_clean", "ce_spliced", "delta_lm_loss", "kl_div", "ce_zero_ablated", "ce_mean_ablated")


def setup(name="llama", cls=None):
    model, _ = build(name, cls)
    ids = ids_for(B=3)
    train = torch.ones_like(ids, dtype=torch.bool)
    train[:, 0] = False
    d = parse_site(SITE, model.base_model).d
    groups = {"a": {SITE: build_sae("jumprelu", d_in=d, d_sae=4 * d, seed=3)},
              "b": {SITE: build_sae("topk", d_in=d, d_sae=4 * d, k=4, seed=4)}}
    return model, [(ids, train)], groups


def independent(model, batches, saes):
    """Today's computation: whole-batch logits, one log-softmax."""
    from jumpscope.models.splice import splice

    (ids, train), = batches
    scored = train[:, :-1] & train[:, 1:]
    with torch.no_grad():
        clean = model(input_ids=ids).logits[:, :-1][scored].log_softmax(-1)
        with splice(model, saes, positions=train):
            spliced = model(input_ids=ids).logits[:, :-1][scored].log_softmax(-1)
    targets = ids[:, 1:][scored]
    ce = -spliced.gather(1, targets[:, None]).mean() + clean.gather(1, targets[:, None]).mean()
    return ce.item(), (clean.exp() * (clean - spliced)).sum(-1).mean().item()


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "neox", "qwen3"])
def test_chunked_equals_unchunked(name):
    model, batches, groups = setup(name)
    assert name != "gemma2" or model.config.final_logit_softcapping  # the soft-capping path is exercised
    whole = spliced_measures(model, "causal_lm", batches, groups)
    for chunk in (1, 8):
        chunked = spliced_measures(model, "causal_lm", batches, groups, chunk=chunk)
        for group in groups:
            for key in KEYS:
                assert chunked[group][key] == pytest.approx(whole[group][key], rel=1e-5, abs=1e-7), (chunk, key)
    for group, saes in groups.items():
        delta, kl = independent(model, batches, saes)
        assert whole[group]["delta_lm_loss"] == pytest.approx(delta, abs=1e-5)  # float32 CEs of ~4.6
        assert whole[group]["kl_div"] == pytest.approx(kl, rel=1e-4, abs=1e-7)


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest freshly allocated tensor with a vocabulary-sized last dimension and
    the largest log-softmax input."""

    def __init__(self):
        super().__init__()
        self.largest = self.log_softmax = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "log_softmax" in func.__name__:
            self.log_softmax = max(self.log_softmax, args[0].numel())
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == V and not t._is_view():
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_bounded_by_the_chunk_not_the_batch():
    model, batches, groups = setup()
    n = 3 * (batches[0][0].shape[1] - 2)
    assert n > 8
    with LargestVocabTensor() as seen:
        spliced_measures(model, "causal_lm", batches, groups, chunk=8)
    assert 0 < seen.log_softmax <= 8 * V and seen.largest <= 8 * V
    with LargestVocabTensor() as unbounded:  # the probe sees a whole batch when the chunk allows it
        spliced_measures(model, "causal_lm", batches, groups, chunk=n)
    assert unbounded.log_softmax == n * V


def test_the_default_chunk_follows_the_vocabulary():
    assert chunk_positions(49_152) == 341 and chunk_positions(256_000) == 65 and chunk_positions(97) > 100_000


class HalvedLogits(tf.LlamaForCausalLM):
    """A model that transforms its logits after the head (as Cohere or Granite do)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_a_logit_transform_after_the_head_falls_back_to_the_models_own_logits(caplog):
    model, batches, groups = setup("llama", HalvedLogits)
    (ids, train), = batches
    assert not head_reproduces_logits(model, ids, torch.ones_like(train))
    with caplog.at_level(logging.WARNING):
        result = spliced_measures(model, "causal_lm", batches, groups, chunk=5)
    assert any("not its LM head's output alone" in r.getMessage() for r in caplog.records)
    for group, saes in groups.items():
        delta, kl = independent(model, batches, saes)
        assert result[group]["delta_lm_loss"] == pytest.approx(delta, abs=1e-5)
        assert result[group]["kl_div"] == pytest.approx(kl, rel=1e-4, abs=1e-7)


@pytest.mark.cuda
def test_targets_on_the_cpu_score_values_on_the_gpu():
    # a cached clean pass is read onto the CPU while the model's values are on the GPU (the eval job
    # on CUDA failed there once); the sums must be those of the CPU
    from jumpscope.evaluate.readout import chunked_sums

    model, _ = build("llama")
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(50, V, generator=generator)
    targets = torch.randint(0, V, (50,), generator=generator)
    cpu = chunked_sums(model, values, targets, values.flip(0), via_head=False, chunk=16)
    gpu = chunked_sums(model.cuda(), values.cuda(), targets, values.flip(0).cuda(), via_head=False, chunk=16)
    assert gpu == pytest.approx(cpu, rel=1e-5)
