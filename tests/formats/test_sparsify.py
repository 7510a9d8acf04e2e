"""EleutherAI sparsify folders: equal to sparsify's forward (re-implemented here from its
formula), exact round trips, hookpoint -> site mapping, and a clear error for every bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import jumpscope
from jumpscope import formats
from jumpscope.cli import main
from jumpscope.formats import load_sparsify, read_sparsify_config, save_sparsify
from jumpscope.formats.sparsify import sparsify_hookpoint, sparsify_sites
from jumpscope.sae import registry

D_IN, N = 6, 16


def coder_tensors(seed=0, dtype=torch.float32, d_in=D_IN, n=N, skip=False):
    """Quarter-integer weights and a bias whose fractional parts i/256 differ per latent: every
    sum below is exact in float32 (so any summation order gives the same bits) and no two
    latents of a token tie, so the top-k choice is unique."""
    g = torch.Generator().manual_seed(seed)

    def quarters(*shape):
        return torch.randint(-8, 9, shape, generator=g).float() / 4

    bias = quarters(n) + torch.arange(n).float() / 256
    tensors = {"encoder.weight": quarters(n, d_in), "encoder.bias": bias, "W_dec": quarters(n, d_in),
               "b_dec": quarters(d_in), **({"W_skip": quarters(d_in, d_in)} if skip else {})}
    return {key: value.to(dtype) for key, value in tensors.items()}


def sparsify_cfg(**changes):
    """A cfg.json as SparseCoder.save_to_disk writes it: the coder config plus d_in."""
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": N, "k": 3,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}
    cfg.update(changes)
    return cfg


def write_coder(folder, tensors=None, **cfg_changes):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(coder_tensors() if tensors is None else tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(sparsify_cfg(**cfg_changes)))
    return folder


def inputs(n=64, seed=1):
    return torch.randint(-4, 5, (n, D_IN), generator=torch.Generator().manual_seed(seed)).float()


def sparsify_encode(t, x, k, transcode=False):
    """sparsify's encoder: ReLU(linear(x - b_dec)) then the top k (sparse_coder.py, fused_encoder.py)."""
    t = {key: value.float() for key, value in t.items()}
    sae_in = x if transcode else x - t["b_dec"]
    pre = torch.relu(torch.nn.functional.linear(sae_in, t["encoder.weight"], t["encoder.bias"]))
    return pre.topk(k, dim=-1, sorted=False)


def sparsify_forward(t, x, top_acts, top_indices):
    """sparsify's output: the selected rows of W_dec weighted by their activations, plus b_dec,
    plus the skip connection x @ W_skip.T on the raw input when there is one."""
    rows = t["W_dec"].float()[top_indices]  # (tokens, k, d_in)
    out = (top_acts.unsqueeze(-1) * rows).sum(-2) + t["b_dec"].float()
    return out + x @ t["W_skip"].float().mT if "W_skip" in t else out


def dense(top_acts, top_indices, n=N):
    return torch.zeros(top_acts.shape[0], n).scatter(-1, top_indices, top_acts)


@pytest.mark.parametrize("k", [3, N - 2])  # N - 2: most tokens have fewer than k positive latents
@pytest.mark.parametrize("transcode, skip", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_decode_equal_sparsify(tmp_path, k, transcode, skip, dtype):
    t = coder_tensors(dtype=dtype, skip=skip)
    folder = write_coder(tmp_path / "layers.2", t, k=k, transcode=transcode, skip_connection=skip)
    sae = formats.load(folder)
    assert sae.architecture == "topk" and sae.cfg.k == k and not sae.training
    assert sae.cfg.apply_b_dec_to_input is (not transcode) and sae.cfg.skip_connection is skip
    assert sae.cfg.d_out == (D_IN if transcode else None)
    x = inputs()
    acts, indices = sparsify_encode(t, x, k, transcode)
    expected = dense(acts, indices)
    assert (expected > 0).sum(-1).min() < k or k == 3  # the k = N - 2 case has tokens with < k positives
    f = sae.encode(x).detach()
    assert torch.equal(f, expected)
    assert torch.equal(sae(x).detach(), sparsify_forward(t, x, acts, indices))
    if not skip:
        assert torch.equal(sae.decode(f).detach(), sparsify_forward(t, x, acts, indices))


def test_random_float_weights_agree_closely(tmp_path):
    g = torch.Generator().manual_seed(5)
    t = {key: torch.randn(value.shape, generator=g) for key, value in coder_tensors().items()}
    sae = formats.load(write_coder(tmp_path / "layers.0", t, k=4))
    x = torch.randn(128, D_IN, generator=g)
    acts, indices = sparsify_encode(t, x, 4)
    torch.testing.assert_close(sae.encode(x).detach(), dense(acts, indices), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x).detach(), sparsify_forward(t, x, acts, indices), rtol=1e-5, atol=1e-5)


def test_detected_apart_from_native_by_cfg_content(tmp_path):
    write_coder(tmp_path / "coder")
    sae = jumpscope.build("topk", d_in=D_IN, d_sae=N, k=3)
    jumpscope.save(sae, tmp_path / "native")
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == ["cfg.json", "sae.safetensors"]
    assert formats.detect_format(tmp_path / "coder") == "sparsify"
    assert formats.detect_format(tmp_path / "native") == "native"
    assert "sparsify" in formats.FORMATS


def test_cfg_of_neither_format_is_a_clear_error(tmp_path):
    folder = write_coder(tmp_path / "x")
    (folder / "cfg.json").write_text(json.dumps({"d_sae": 4, "hook_name": "blocks.0.hook_resid_post"}))
    with pytest.raises(ValueError, match=r"fits neither: native needs .*sparsify needs .*found keys \['d_sae', "):
        formats.detect_format(folder)
    with pytest.raises(ValueError, match="fits neither"):
        jumpscope.load(folder)


def test_our_topk_round_trip_is_bit_exact(tmp_path):
    sae = registry.build("topk", d_in=D_IN, d_sae=N, k=3, site="layers.4.resid_post", normalize_decoder=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    written = jumpscope.save(sae, tmp_path / "layers.4", format="sparsify")
    assert sorted(p.name for p in written.iterdir()) == ["cfg.json", "sae.safetensors"]
    stored = load_file(written / "sae.safetensors")
    assert sorted(stored) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]
    assert stored["encoder.weight"].shape == (N, D_IN) and torch.equal(stored["encoder.weight"], sae.W_enc.T)
    loaded = jumpscope.load(written)
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(loaded, key), getattr(sae, key)), key
    assert (loaded.cfg.k, loaded.cfg.site, loaded.cfg.normalize_decoder) == (3, "layers.4.resid_post", False)
    x = torch.randn(64, D_IN, generator=g)
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_folder_round_trip_is_bit_exact(tmp_path, skip):
    t = coder_tensors(seed=3, skip=skip)
    write_coder(tmp_path / "a" / "layers.1.mlp", t, k=5, transcode=True, normalize_decoder=False,
                skip_connection=skip)
    loaded = load_sparsify(tmp_path / "a" / "layers.1.mlp")
    assert (loaded.cfg.site, loaded.cfg.target_site) == ("layers.1.mlp_in", "layers.1.mlp_out")
    save_sparsify(loaded, tmp_path / "b" / "layers.1.mlp")
    back = load_file(tmp_path / "b" / "layers.1.mlp" / "sae.safetensors")
    assert sorted(back) == sorted(t) and all(torch.equal(back[key], t[key]) for key in t)
    written = json.loads((tmp_path / "b" / "layers.1.mlp" / "cfg.json").read_text())
    original = sparsify_cfg(k=5, transcode=True, normalize_decoder=False, skip_connection=skip)
    del original["expansion_factor"]  # unused beside num_latents; written only when it is exact (16 / 6 is not)
    assert written == original


def test_uncentred_sae_is_folded_and_other_architectures_refused(tmp_path):
    sae = registry.build("topk", d_in=D_IN, d_sae=N, k=3, apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D_IN, generator=torch.Generator().manual_seed(1)))
    with pytest.warns(UserWarning, match="sparsify keeps no site"):
        save_sparsify(registry.build("topk", d_in=D_IN, d_sae=N, k=3, site="layers.2.mlp_out"), tmp_path / "misnamed")
    loaded = load_sparsify(save_sparsify(sae, tmp_path / "folded"))
    assert loaded.cfg.apply_b_dec_to_input and loaded.cfg.d_out is None
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'jumprelu' SAE cannot be written in sparsify's format"):
        jumpscope.save(registry.build("jumprelu", d_in=D_IN, d_sae=N), tmp_path / "j", format="sparsify")
    with pytest.raises(ValueError, match="read and predict tensors of one width"):
        save_sparsify(registry.build("topk", d_in=D_IN, d_sae=N, k=3, d_out=4, apply_b_dec_to_input=False),
                      tmp_path / "t")


def test_our_skip_transcoder_round_trip(tmp_path):
    sae = registry.build("topk", d_in=D_IN, d_sae=N, k=3, d_out=D_IN, apply_b_dec_to_input=False,
                         skip_connection=True, site="layers.2.mlp_in", target_site="layers.2.mlp_out")
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    loaded = jumpscope.load(jumpscope.save(sae, tmp_path / "layers.2.mlp", format="sparsify"))
    assert torch.equal(loaded.W_skip, sae.W_skip)
    assert (loaded.cfg.site, loaded.cfg.target_site, loaded.cfg.d_out) == ("layers.2.mlp_in", "layers.2.mlp_out", D_IN)
    x = torch.randn(64, D_IN, generator=g)
    assert torch.equal(loaded(x), sae(x))


@pytest.mark.parametrize("hookpoint, transcode, model, sites", [
    ("layers.6", False, None, ("layers.6.resid_post", None)),
    ("h.2", False, "gpt2", ("layers.2.resid_post", None)),
    ("gpt_neox.layers.3", False, None, ("layers.3.resid_post", None)),
    ("layers.6.mlp", False, "EleutherAI/pythia-70m", ("layers.6.mlp_out", None)),
    ("layers.6.mlp", True, None, ("layers.6.mlp_in", "layers.6.mlp_out")),
    ("layers.6", True, None, ("layers.6.resid_pre", "layers.6.resid_post")),
    ("layers.6.self_attn", False, "meta-llama/Llama-3.2-1B", ("layers.6.attn_out", None)),
    ("layers.7.self_attn.o_proj", False, None, ("layers.7.attn_out", None)),
    ("h.1.mlp.c_proj", False, "gpt2", ("layers.1.mlp_out", None)),
    # our mlp_out is after Gemma 2's post-norm, which the MLP module's output is not
    ("layers.6.mlp", False, "google/gemma-2-2b", ("layers.6.mlp", None)),
    ("layers.6.mlp", True, "google/gemma-2-2b", ("layers.6.mlp_in", "layers.6.mlp")),
    ("layers.6.mlp.down_proj", True, None, ("layers.6.mlp.down_proj", "layers.6.mlp.down_proj")),
    ("embed_tokens", False, None, ("embed_tokens", None)),
])
def test_hookpoints_map_to_sites(hookpoint, transcode, model, sites):
    assert sparsify_sites(hookpoint, transcode, model) == sites


def test_folder_names_give_site_and_model(tmp_path):
    run = tmp_path / "checkpoints" / "run"
    write_coder(run / "layers.6.mlp" / "seed1")
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "sae": {"k": 3}}))
    sae = jumpscope.load(run / "layers.6.mlp" / "seed1")
    assert (sae.cfg.model, sae.cfg.site) == ("EleutherAI/pythia-70m", "layers.6.mlp_out")
    write_coder(run / "layers.2")
    sae = jumpscope.load(run / "layers.2", model="other/model", site="layers.9.resid_post")
    assert (sae.cfg.model, sae.cfg.site) == ("other/model", "layers.9.resid_post")
    assert sparsify_hookpoint("layers.2.resid_post") == "layers.2"
    assert sparsify_hookpoint("layers.2.mlp_out") == "layers.2.mlp" and sparsify_hookpoint("layers.2.mlp_in") is None


def test_expansion_factor_and_legacy_fields(tmp_path):
    write_coder(tmp_path / "c", num_latents=0, expansion_factor=N // 2, d_in=2,
                tensors=coder_tensors(d_in=2, n=N))
    assert read_sparsify_config(tmp_path / "c")["num_latents"] == N
    cfg = {key: value for key, value in sparsify_cfg().items() if key not in ("activation", "skip_connection",
                                                                              "transcode")}
    (tmp_path / "c" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 2, "signed": False}))  # EleutherAI/sae
    assert read_sparsify_config(tmp_path / "c") == {"d_in": 2, "num_latents": N, "k": 3, "transcode": False,
                                                    "skip_connection": False, "normalize_decoder": True,
                                                    "multi_topk": False}


@pytest.mark.parametrize("changes, match", [
    ({"skip_connection": True}, r"missing keys \['W_skip'\]"),
    ({"signed": True}, r"signed=True is not supported: .*\|pre-activation\|"),
    ({"activation": "groupmax"}, r"activation='groupmax' is not supported"),
    ({"embed_skip": True}, r"embed_skip=True is not supported"),
    ({"gram_lookup": True}, r"gram_lookup=True is not supported"),
    ({"new_trick": True}, r"unknown sparsify config field\(s\) \['new_trick'\]"),
    ({"k": N + 1}, r"k=17 exceeds the number of latents 16"),
    ({"k": 0}, r"k must be a positive integer, got 0"),
    ({"transcode": "yes"}, r"transcode must be true or false"),
    ({"num_latents": N + 1}, r"wrong tensor shapes: encoder.weight \(16, 6\) \(expected \(17, 6\)\)"),
])
def test_bad_configs(tmp_path, changes, match):
    folder = write_coder(tmp_path / "layers.0", **changes)
    with pytest.raises(ValueError, match=match):
        load_sparsify(folder)


def edit_weights(change):
    t = coder_tensors()
    change(t)
    return t


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update({"encoder.weight": t["encoder.weight"].T.contiguous()}),
     r"wrong tensor shapes: encoder.weight \(6, 16\) \(expected \(16, 6\)\)"),
    (lambda t: t.update(W_skip=torch.zeros(D_IN, D_IN)), r"unexpected keys \['W_skip'\]"),  # skip_connection false
    (lambda t: t.pop("W_dec"), r"missing keys \['W_dec'\]"),
    (lambda t: t.update(b_dec=torch.arange(D_IN)), "tensor 'b_dec' has dtype torch.int64"),
    (lambda t: t["W_dec"].__setitem__((0, 0), math.nan), "'W_dec' holds 1 NaN or infinite"),
])
def test_bad_weights(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        load_sparsify(write_coder(tmp_path / "layers.0", edit_weights(change)))


def test_missing_files(tmp_path):
    folder = write_coder(tmp_path / "layers.0")
    (folder / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing sae.safetensors"):
        load_sparsify(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sparsify(tmp_path / "nowhere")
    (folder / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing cfg.json"):
        load_sparsify(folder)


def test_cli_info_and_convert(tmp_path, capsys):
    folder = write_coder(tmp_path / "layers.3")
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "sparsify" in out and "topk" in out and "layers.3.resid_post" in out
    assert main(["convert", str(folder), str(tmp_path / "native"), "--to", "native"]) == 0
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "back" / "layers.3"), "--to", "sparsify"]) == 0
    back = load_file(tmp_path / "back" / "layers.3" / "sae.safetensors")
    assert all(torch.equal(back[key], value) for key, value in coder_tensors().items())
    (folder / "cfg.json").write_text(json.dumps(sparsify_cfg(embed_skip=True)))
    assert main(["info", str(folder)]) == 2
    assert "embed_skip=True is not supported" in capsys.readouterr().err


# -- hostile configs and files: a FormatError naming the file ------------------------------------
@pytest.mark.parametrize("changes, match", [
    ({"d_in": True}, "d_in must be a positive integer, got True"),
    ({"num_latents": 10**12}, r"num_latents must be a positive integer, got 1000000000000 \(at most"),
    ({"num_latents": 0, "expansion_factor": 10**9}, r"latents \(d_in times expansion_factor\) is more than"),
    ({"d_in": 46341, "num_latents": 46341}, r"wrong tensor shapes: .*\(expected \(46341, 46341\)\)"),
    ({"k": 2.5}, "k must be a positive integer, got 2.5"),
    ({"normalize_decoder": None}, "normalize_decoder must be true or false, got None"),
    ({"new_trick": [[[[1]]]] * 1000}, r"unknown sparsify config field\(s\) \['new_trick'\]"),
])
def test_hostile_configs(tmp_path, changes, match):
    from jumpscope.errors import FormatError

    folder = write_coder(tmp_path / "layers.0", **changes)
    with pytest.raises(FormatError, match=match) as error:
        jumpscope.load(folder)
    assert str(folder) in str(error.value) and len(str(error.value)) < 1000


def test_non_regular_files_and_nested_json(tmp_path):
    import os

    from jumpscope.errors import FormatError

    folder = write_coder(tmp_path / "layers.0")
    (folder / "sae.safetensors").unlink()
    (folder / "sae.safetensors").symlink_to("/dev/zero")
    with pytest.raises(FormatError, match="sae.safetensors is not a regular file"):
        load_sparsify(folder)
    (folder / "cfg.json").unlink()
    os.mkfifo(folder / "cfg.json")
    with pytest.raises(FormatError, match="cfg.json is not a regular file"):
        load_sparsify(folder)
    (folder / "cfg.json").unlink()
    (folder / "cfg.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FormatError, match="cfg.json is not valid JSON"):
        load_sparsify(folder)
