"""SAELens folders: round trips, hand-written SAELens 5.x/6.x folders against the formulas of
SAELens's encoders, the folds, and clear refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jumpscope.formats import load_saelens, load_saelens_sparsity, save_saelens
from jumpscope.sae import registry
from jumpscope.sae.batchtopk import BatchTopKSAE  # noqa: F401  (registers the architectures)
from jumpscope.sae.gated import GatedSAE
from jumpscope.sae.jumprelu import JumpReLUSAE
from jumpscope.sae.relu import ReLUSAE
from jumpscope.sae.topk import TopKSAE

D_IN, D_SAE = 8, 16
SITE = "blocks.2.hook_resid_post"
CASES = {  # case: (architecture, config fields, SAELens architecture written)
    "relu": ("relu", {}, "standard"), "relu_centred": ("relu", {"apply_b_dec_to_input": True}, "standard"),
    "relu_transcoder": ("relu", {"d_out": 5}, "transcoder"), "jumprelu": ("jumprelu", {}, "jumprelu"),
    "jumprelu_log_centred": ("jumprelu", {"log_threshold": True, "apply_b_dec_to_input": True}, "jumprelu"),
    "jumprelu_transcoder": ("jumprelu", {"d_out": 5}, "jumprelu_transcoder"), "gated": ("gated", {}, "gated"),
    "topk": ("topk", {"k": 3}, "topk"), "topk_uncentred": ("topk", {"k": 3, "apply_b_dec_to_input": False}, "topk"),
    "batchtopk": ("batchtopk", {"k": 3}, "jumprelu"),
}


def make(case: str, seed: int = 0):
    name, fields, _ = CASES[case]
    sae = registry.build(name, d_in=D_IN, d_sae=D_SAE, model="gpt2", site=SITE, **fields)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in list(sae.named_parameters()) + list(sae.named_buffers()):
            if key in ("threshold_raw", "threshold", "log_threshold"):
                value = torch.rand(tensor.shape, generator=g) * 0.4 + 0.05
                tensor.copy_(value.log() if key == "log_threshold" else value)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.5)
    return sae.eval()


def inputs(n=64, seed=1):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip(tmp_path, case):
    sae = make(case)
    save_saelens(sae, tmp_path)
    document = json.loads((tmp_path / "cfg.json").read_text())
    assert document["architecture"] == CASES[case][2]
    loaded = load_saelens(tmp_path)
    x = inputs()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))
    assert loaded.cfg.model == "gpt2" and loaded.cfg.site == SITE and not loaded.training
    if case == "batchtopk":
        assert isinstance(loaded, JumpReLUSAE)
        assert torch.equal(loaded.threshold, sae.threshold.expand(D_SAE))
        return
    assert type(loaded) is type(sae)
    assert loaded.cfg.apply_b_dec_to_input == sae.cfg.apply_b_dec_to_input
    assert loaded.cfg.d_output == sae.cfg.d_output
    for key, value in sae.state_dict().items():
        if key == "log_threshold":
            assert torch.equal(loaded.threshold, sae.threshold)
        else:
            assert torch.equal(loaded.state_dict()[key], value), key


def test_config_holds_flat_and_nested_fields(tmp_path):
    save_saelens(make("topk"), tmp_path, metadata={"context_size": 1024, "dataset_path": "pile"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    # SAELens 6.x: forward-pass fields flat, the rest nested, a >= 6.0.0 version in metadata.
    assert {key: cfg[key] for key in ("d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations",
                                      "k", "rescale_acts_by_decoder_norm")} == {
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "k": 3, "rescale_acts_by_decoder_norm": False}
    meta = cfg["metadata"]
    assert meta["sae_lens_version"] == "6.0.0" and meta["model_name"] == "gpt2" and meta["hook_name"] == SITE
    assert meta["context_size"] == 1024 and meta["dataset_path"] == "pile"
    # SAELens 5.x: every field its SAEConfig requires, at the top level.
    required_5x = {"architecture", "d_in", "d_sae", "activation_fn_str", "apply_b_dec_to_input",
                   "finetuning_scaling_factor", "context_size", "model_name", "hook_name", "hook_layer",
                   "hook_head_index", "prepend_bos", "dataset_path", "dataset_trust_remote_code",
                   "normalize_activations", "dtype", "device", "sae_lens_training_version"}
    assert required_5x <= set(cfg)
    assert cfg["activation_fn_str"] == "topk" and cfg["activation_fn_kwargs"] == {"k": 3}
    assert cfg["hook_layer"] == 2 and cfg["context_size"] == 1024


def test_sparsity_file(tmp_path):
    counts = torch.tensor([0, 1, 5, 10] * 4, dtype=torch.int64)
    save_saelens(make("jumprelu"), tmp_path, density={"firing_counts": counts, "n_tokens": 10})
    expected = np.log10(counts.numpy() / 10 + 1e-10).astype(np.float32)
    np.testing.assert_allclose(load_saelens_sparsity(tmp_path).numpy(), expected, rtol=1e-6)
    save_saelens(make("jumprelu"), tmp_path)
    assert load_saelens_sparsity(tmp_path) is None


# -- hand-written folders, as SAELens writes them -------------------------------------------------

def write_folder(folder, cfg, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({key: value.contiguous() for key, value in tensors.items()}, folder / "sae_weights.safetensors")
    return folder


def random_weights(keys, seed=0, d_out=D_IN):
    g = torch.Generator().manual_seed(seed)
    shapes = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, d_out), "b_dec": (d_out,)}
    return {key: torch.randn(shapes.get(key, (D_SAE,)), generator=g) * 0.5 for key in keys}


def v6(architecture, **fields):
    return {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.5.0", "model_name": "gemma-2-2b", "hook_name": SITE}, **fields}


def v5(**fields):
    return {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "relu",
            "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "context_size": 128,
            "model_name": "gpt2-small", "hook_point": "blocks.4.hook_resid_pre", "hook_point_layer": 4,
            "hook_point_head_index": None, "prepend_bos": True, "dataset_path": "owt",
            "dataset_trust_remote_code": True, "normalize_activations": "none", "dtype": "torch.float32",
            "device": "cpu", "sae_lens_training_version": "3.0.0", **fields}


def test_v6_jumprelu_with_negative_thresholds(tmp_path):
    w = random_weights(["W_enc", "W_dec", "b_enc", "b_dec", "threshold"])
    w["threshold"][::2] *= -1
    sae = load_saelens(write_folder(tmp_path, v6("jumprelu"), w))
    assert isinstance(sae, JumpReLUSAE) and sae.cfg.model == "gemma-2-2b" and sae.cfg.site == SITE
    x = inputs()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = torch.relu(pre) * (pre > w["threshold"].relu())  # SAELens JumpReLUSAE.encode
    assert torch.equal(sae.encode(x), expected)
    assert torch.equal(sae.decode(expected), expected @ w["W_dec"] + w["b_dec"])


def test_v5_standard_with_old_field_names(tmp_path):
    cfg = v5()
    del cfg["apply_b_dec_to_input"]  # SAELens's default: True
    w = random_weights(["W_enc", "W_dec", "b_enc", "b_dec"])
    sae = load_saelens(write_folder(tmp_path, cfg, w))
    assert isinstance(sae, ReLUSAE) and sae.cfg.site == "blocks.4.hook_resid_pre" and sae.cfg.model == "gpt2-small"
    x = inputs()
    assert torch.equal(sae.encode(x), torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]))


def topk_reference(pre, k):
    """Keep each row's k largest entries (chosen by numpy's sort), ReLU'd."""
    order = np.argsort(-pre.numpy(), axis=-1, kind="stable")[:, :k]
    mask = np.zeros(pre.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return torch.relu(pre) * torch.from_numpy(mask)


def test_v5_topk_as_standard_with_activation_kwargs(tmp_path):
    cfg = v5(activation_fn_str="topk", activation_fn_kwargs={"k": 4}, apply_b_dec_to_input=False)
    w = random_weights(["W_enc", "W_dec", "b_enc", "b_dec"])
    sae = load_saelens(write_folder(tmp_path, cfg, w))
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 4 and not sae.cfg.apply_b_dec_to_input
    x = inputs()
    assert torch.equal(sae.encode(x), topk_reference(x @ w["W_enc"] + w["b_enc"], 4))


def test_v6_gated(tmp_path):
    w = random_weights(["W_enc", "W_dec", "b_gate", "r_mag", "b_mag", "b_dec"])
    sae = load_saelens(write_folder(tmp_path, v6("gated"), w))
    assert isinstance(sae, GatedSAE)
    x = inputs()
    sae_in = x - w["b_dec"]
    gate = sae_in @ w["W_enc"] + w["b_gate"]
    magnitude = sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]
    torch.testing.assert_close(sae.encode(x), (gate > 0) * torch.relu(magnitude), rtol=1e-5, atol=1e-6)


def test_v6_topk_rescaled_by_decoder_norm_is_folded(tmp_path):
    w = random_weights(["W_enc", "W_dec", "b_enc", "b_dec"])
    sae = load_saelens(write_folder(tmp_path, v6("topk", k=3, rescale_acts_by_decoder_norm=True), w))
    x = inputs()
    norms = w["W_dec"].norm(dim=-1)
    acts = topk_reference(((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms, 3)
    torch.testing.assert_close(sae.encode(x), acts, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae(x), (acts / norms) @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-6)


def test_batchtopk_training_checkpoint(tmp_path):
    w = random_weights(["W_enc", "W_dec", "b_enc", "b_dec"])
    w["topk_threshold"] = torch.tensor(0.3, dtype=torch.float64)
    cfg = v6("batchtopk", k=3.0, rescale_acts_by_decoder_norm=False)
    sae = load_saelens(write_folder(tmp_path, cfg, w))
    assert isinstance(sae, BatchTopKSAE) and sae.cfg.k == 3
    x = inputs()
    acts = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert torch.equal(sae.encode(x), acts * (acts > torch.tensor(0.3, dtype=torch.float32)))


def test_log_threshold_and_bfloat16(tmp_path):
    w = random_weights(["W_enc", "W_dec", "b_enc", "b_dec"])
    w = {key: value.bfloat16() for key, value in w.items()}
    w["log_threshold"] = torch.full((D_SAE,), math.log(0.25))
    sae = load_saelens(write_folder(tmp_path, v6("jumprelu", dtype="bfloat16"), w))
    assert sae.W_enc.dtype == torch.float32 and torch.equal(sae.W_enc, w["W_enc"].float())
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.25), rtol=1e-6, atol=0)


def test_expected_average_only_in_needs_the_factor(tmp_path):
    w = random_weights(["W_enc", "W_dec", "b_enc", "b_dec"])
    folder = write_folder(tmp_path, v6("standard", normalize_activations="expected_average_only_in"), w)
    with pytest.raises(ValueError, match="pass norm_scaling_factor"):
        load_saelens(folder)
    s = 4.0
    sae = load_saelens(folder, norm_scaling_factor=s)
    x = inputs()
    acts = torch.relu((x * s - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # the SAE on x * s
    torch.testing.assert_close(sae.encode(x), acts, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae(x), (acts @ w["W_dec"] + w["b_dec"]) / s, rtol=1e-5, atol=1e-6)


def test_finetuning_scaling_factor_is_folded(tmp_path):
    w = random_weights(["W_enc", "W_dec", "b_enc", "b_dec"])
    scale = torch.rand(D_SAE, generator=torch.Generator().manual_seed(9)) + 0.5
    sae = load_saelens(write_folder(tmp_path, v5(finetuning_scaling_factor=True), {**w, "scaling_factor": scale}))
    acts = sae.encode(inputs())
    torch.testing.assert_close(sae.decode(acts), (acts * scale) @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-6)
    ones = write_folder(tmp_path / "ones", v5(), {**w, "scaling_factor": torch.ones(D_SAE)})
    assert torch.equal(load_saelens(ones).W_dec, w["W_dec"])
    with pytest.raises(ValueError, match="scaling_factor is present but finetuning_scaling_factor is false"):
        load_saelens(write_folder(tmp_path / "bad", v5(), {**w, "scaling_factor": scale}))


def test_hook_head_index_warns(tmp_path):
    cfg = v5(hook_point="blocks.1.attn.hook_z", hook_point_head_index=3)
    with pytest.warns(UserWarning, match="hook_head_index=3 is not kept"):
        load_saelens(write_folder(tmp_path, cfg, random_weights(["W_enc", "W_dec", "b_enc", "b_dec"])))


@pytest.mark.parametrize("cfg, match", [
    (v6("standard", normalize_activations="layer_norm"), "normalize_activations='layer_norm'.*non-linear"),
    (v6("standard", normalize_activations="covariance_whitening"), "whitening statistics"),
    (v6("matching_pursuit"), "architecture 'matching_pursuit' is not supported"),
    (v5(activation_fn_str="tanh-relu"), "activation_fn 'tanh-relu' is not supported"),
    (v6("topk", k=2.5), "k must be a positive integer"),
    ({**v6("standard"), "d_sae": "16"}, "d_sae must be a positive integer"),
])
def test_unsupported_configs(tmp_path, cfg, match):
    with pytest.raises(ValueError, match=match):
        load_saelens(write_folder(tmp_path, cfg, random_weights(["W_enc", "W_dec", "b_enc", "b_dec"])))


@pytest.mark.parametrize("change, match", [
    (lambda w: w.pop("b_enc"), r"missing keys \['b_enc'\]"),
    (lambda w: w.update(W_skip=torch.zeros(3)), r"unexpected keys \['W_skip'\]"),
    (lambda w: w.update(W_dec=torch.zeros(D_SAE, D_IN + 1)), r"wrong tensor shapes: W_dec \(16, 9\)"),
    (lambda w: w["W_enc"].__setitem__((1, 1), math.nan), "'W_enc' holds 1 NaN or infinite"),
    (lambda w: w.update(b_enc=torch.arange(D_SAE)), "'b_enc' has dtype torch.int64"),
])
def test_invalid_weights(tmp_path, change, match):
    w = random_weights(["W_enc", "W_dec", "b_enc", "b_dec"])
    change(w)
    with pytest.raises(ValueError, match=match):
        load_saelens(write_folder(tmp_path, v6("standard"), w))


def test_truncated_weights(tmp_path):
    folder = save_saelens(make("gated"), tmp_path)
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[:-40])
    with pytest.raises(ValueError, match="sae_weights.safetensors is truncated or not a valid safetensors"):
        load_saelens(folder)


def test_unrepresentable_saes_are_refused(tmp_path):
    sae = make("jumprelu")
    with torch.no_grad():
        sae.threshold_raw[0] = -0.1
    with pytest.raises(ValueError, match="negative JumpReLU thresholds"):
        save_saelens(sae, tmp_path)
    topk_transcoder = registry.build("topk", d_in=D_IN, d_sae=D_SAE, d_out=5, k=2, apply_b_dec_to_input=False)
    with pytest.raises(ValueError, match="SAELens has no topk transcoder"):
        save_saelens(topk_transcoder, tmp_path)


# -- hostile configs: a FormatError naming the file, never a raw torch or Python error ------------
@pytest.mark.parametrize("cfg, match", [
    (v6("transcoder", d_out=-1), r"d_out must be a positive integer, got -1"),
    (v6("standard", d_in=True), "d_in must be a positive integer, got True"),
    (v6("standard", d_sae=10**12), r"d_sae must be a positive integer, got 1000000000000 \(at most"),
    (v5(activation_fn_str="topk", activation_fn_kwargs=[3]), "activation_fn_kwargs must be a dict, got \\[3\\]"),
    (v5(activation_fn_str=["relu"]), "activation_fn must be a str"),
    (v6(7), "architecture must be a str, got 7"),
    (v6("standard", apply_b_dec_to_input="yes"), "apply_b_dec_to_input must be a bool"),
    (v6("topk", k=10**400), "TopK k must be a positive integer"),
    (v6("topk", k=float("nan")), "TopK k must be a positive integer, got nan"),
    (v6("standard", metadata={"model_name": ["x"], "hook_name": SITE}), "model must be a string"),
    (v6("jumprelu", metadata={"hook_name": 5}), "site must be a string"),
    (v6("standard", d_in=46341, d_sae=46341), r"wrong tensor shapes: .*W_enc \(8, 16\) \(expected \(46341, 46341\)\)"),
])
def test_hostile_configs_are_refused_naming_the_file(tmp_path, cfg, match):
    from jumpscope.errors import FormatError

    keys = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if "jumprelu" in str(cfg["architecture"]) else [])
    folder = write_folder(tmp_path / "sae", cfg, random_weights(keys))
    with pytest.raises(FormatError, match=match) as error:
        load_saelens(folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


def test_nested_json_and_non_regular_weights(tmp_path):
    import os

    from jumpscope.errors import FormatError

    folder = write_folder(tmp_path / "sae", v6("standard"), random_weights(["W_enc", "W_dec", "b_enc", "b_dec"]))
    (folder / "cfg.json").write_text('{"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(FormatError, match="cfg.json is not valid JSON"):
        load_saelens(folder)
    (folder / "cfg.json").write_text(json.dumps(v6("standard")))
    (folder / "sae_weights.safetensors").unlink()
    os.mkfifo(folder / "sae_weights.safetensors")
    with pytest.raises(FormatError, match="sae_weights.safetensors is not a regular file") as error:
        load_saelens(folder)
    assert str(folder) in str(error.value)
