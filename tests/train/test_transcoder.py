"""Transcoders: read one site, predict another, with an optional linear skip connection."""

import copy

import pytest
import torch

import jumpscope
from jumpscope.sae import StepContext, build
from jumpscope.train import Trainer, TrainerConfig
from sae_checks import randomize, sparse_dictionary_data

D_IN, D_OUT = 16, 12


def transcoder(arch, **fields):
    extra = {"k": 4, "apply_b_dec_to_input": False} if arch == "topk" else {"target_l0": 4}
    return build(arch, d_in=D_IN, d_sae=64, d_out=D_OUT, skip_connection=True, site="layers.0.mlp_in",
                 target_site="layers.0.mlp_out", **extra, **fields)


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_prediction_adds_the_skip_and_the_skip_is_trained(arch):
    sae = randomize(transcoder(arch, kernel="dense"), seed=1, scale=0.3)
    x = torch.randn(32, D_IN)
    assert torch.allclose(sae(x), sae.decode(sae.encode(x)) + x @ sae.W_skip, atol=1e-6)
    target = torch.randn(32, D_OUT)
    out = sae.loss(x, StepContext(), target)
    assert torch.allclose(out.reconstruction, sae(x), atol=1e-5)  # metrics see the whole prediction
    out.loss.backward()
    assert sae.W_skip.grad is not None and sae.W_skip.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_sparse_and_dense_paths_give_the_same_skip_gradient(arch):
    dense = randomize(transcoder(arch, kernel="dense"), seed=2, scale=0.3)
    sparse = copy.deepcopy(dense)
    sparse.cfg = type(dense.cfg).from_dict({**dense.cfg.to_dict(), "kernel": "sparse"})
    x, target = torch.randn(64, D_IN), torch.randn(64, D_OUT)
    for sae in (dense, sparse):
        sae.loss(x, StepContext(), target).loss.backward()
    torch.testing.assert_close(sparse.W_skip.grad, dense.W_skip.grad, atol=1e-5, rtol=1e-4)


def test_a_linear_map_is_learned_by_the_skip():
    torch.manual_seed(0)
    x = sparse_dictionary_data(n=4096, d=D_IN, seed=3)
    mixing = torch.randn(D_IN, D_OUT) / D_IN ** 0.5
    target = x @ mixing
    fast = dict(lr=5e-3, lr_warmup_steps=5)
    with_skip = transcoder("topk", **fast)
    without = build("topk", d_in=D_IN, d_sae=64, d_out=D_OUT, k=4, apply_b_dec_to_input=False, **fast)
    trained = Trainer({"skip": with_skip, "plain": without},
                      TrainerConfig(batch_size=256, total_tokens=4096 * 6, progress=False, init_sample_tokens=1024)
                      ).fit([(x[i:i + 256], target[i:i + 256]) for _ in range(6) for i in range(0, 4096, 256)])
    errors = {name: ((sae(x) - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()).item()
              for name, sae in trained.items()}
    assert errors["skip"] < 0.5 * errors["plain"]


def test_fold_scales_the_skip_by_output_over_input_scale():
    sae = randomize(transcoder("topk"), seed=4)  # no thresholds: randomize cannot break the fold's premises
    x = torch.randn(16, D_IN) * 7.0
    folded = copy.deepcopy(sae)
    folded.fold_scaling(7.0, 3.0)
    torch.testing.assert_close(folded(x), 3.0 * sae(x / 7.0), atol=1e-5, rtol=1e-5)


def test_native_round_trip_and_formats_that_cannot_hold_a_skip(tmp_path):
    sae = randomize(transcoder("jumprelu"), seed=5)
    sae.save(tmp_path / "native")
    loaded = jumpscope.load(tmp_path / "native")
    assert loaded.cfg.target_site == "layers.0.mlp_out" and loaded.cfg.skip_connection
    x = torch.randn(8, D_IN)
    assert torch.equal(loaded(x), sae(x))
    for fmt in ("gemma_scope", "saelens"):
        with pytest.raises(ValueError, match="skip connection"):
            sae.save(tmp_path / fmt, format=fmt)


def test_architectures_without_a_skip_refuse_one():
    with pytest.raises(ValueError, match="relu architecture has no skip connection"):
        build("relu", d_in=D_IN, d_sae=32, skip_connection=True)


def tiny_llama_transcoder(model, layer=0, **fields):
    from jumpscope.models.sites import parse_site

    d = parse_site(f"layers.{layer}.mlp_in", model.base_model).d
    return build("topk", d_in=d, d_sae=48, d_out=d, k=6, apply_b_dec_to_input=False, skip_connection=True,
                 site=f"layers.{layer}.mlp_in", target_site=f"layers.{layer}.mlp_out", **fields)


def test_splicing_a_transcoder_replaces_the_mlp_output_with_its_prediction():
    from jumpscope.models.harvest import Harvester
    from jumpscope.models.splice import splice
    from tiny_models import build as build_model, ids_for

    model, _ = build_model("llama")
    ids = ids_for()
    tc = randomize(tiny_llama_transcoder(model), seed=6, scale=0.2)
    sites = ["layers.0.resid_pre", "layers.0.attn_out", "layers.0.mlp_in"]
    clean = Harvester(model, sites + ["layers.0.resid_post"]).activations(ids)
    with splice(model, {"layers.0.mlp_out": tc}):
        spliced = Harvester(model, ["layers.0.resid_post"]).activations(ids)["layers.0.resid_post"]
    expected = clean["layers.0.resid_pre"] + clean["layers.0.attn_out"] + tc(clean["layers.0.mlp_in"])
    assert torch.allclose(spliced, expected, atol=1e-5)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with splice(model, {"layers.0.mlp_out": tc}, keep_error=True):
            kept = model(input_ids=ids).logits
    assert torch.allclose(kept, logits, atol=1e-4)  # the error term restores the MLP output exactly
    wrong = tiny_llama_transcoder(model, layer=0)
    wrong.cfg = type(wrong.cfg).from_dict({**wrong.cfg.to_dict(), "d_out": 5})
    with pytest.raises(ValueError, match="d_out=5 does not fit site 'layers.0.mlp_out'"):
        splice(model, {"layers.0.mlp_out": wrong})
