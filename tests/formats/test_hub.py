"""SAEs on the Hugging Face hub, without network: a fake hub cache under tmp_path, the repo+path
and hf:// forms, what Gemma Scope names tell, and clear errors when a file is not cached."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import jumpscope
from jumpscope import formats
from jumpscope.formats import hub
from jumpscope.formats.hub import HubRef
from jumpscope.formats.native import read_metadata
from jumpscope.sae.jumprelu import JumpReLUSAE

REPO = "google/gemma-scope-2b-pt-res"
SAE_ID = "layer_20/width_16k/average_l0_71"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
D_IN, N = 6, 10


def params(seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"W_enc": rng.normal(size=(D_IN, N)), "W_dec": rng.normal(size=(N, D_IN)), "b_enc": rng.normal(size=N),
              "b_dec": rng.normal(size=D_IN), "threshold": rng.uniform(0.05, 0.5, size=N)}
    return {key: value.astype(np.float32) for key, value in arrays.items()}


def cached_file(cache: Path, repo: str, path: str) -> Path:
    """Where huggingface_hub keeps ``path`` of ``repo`` at ``main`` (refs/main -> snapshots/<commit>)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    file = root / "snapshots" / COMMIT / path
    file.parent.mkdir(parents=True, exist_ok=True)
    return file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache that HF_HUB_CACHE points at; HF_HUB_OFFLINE guards against any download."""
    folder = tmp_path / "hf_cache"
    folder.mkdir()
    for variable in ("HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


@pytest.fixture
def gemma_scope(cache):
    p = params()
    np.savez(cached_file(cache, REPO, f"{SAE_ID}/params.npz"), **p)
    return p


def spec_encode(p, x):
    pre = x @ p["W_enc"] + p["b_enc"]
    return (pre > p["threshold"]) * np.maximum(pre, 0)


def check_gemma_scope(sae, p):
    assert isinstance(sae, JumpReLUSAE) and not sae.training
    assert (sae.cfg.model, sae.cfg.site) == ("google/gemma-2-2b", "layers.20.resid_post")
    assert sae.source == {"repo_id": REPO, "path": SAE_ID, "revision": "main", "commit": COMMIT,
                          "model": "google/gemma-2-2b", "transcoder": False, "layer": 20,
                          "site": "layers.20.resid_post", "width": "16k", "average_l0": 71}
    x = np.random.default_rng(3).normal(size=(32, D_IN)).astype(np.float32)
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).detach().numpy(), spec_encode(p, x), rtol=1e-5,
                               atol=1e-5)


def test_repo_and_path_offline(gemma_scope):
    check_gemma_scope(jumpscope.load(REPO, SAE_ID), gemma_scope)


@pytest.mark.parametrize("text", [f"hf://{REPO}/{SAE_ID}", f"hf://{REPO}/{SAE_ID}/params.npz",
                                  f"hf://{REPO}@{COMMIT}/{SAE_ID}/"])
def test_one_string_form(gemma_scope, text):
    sae = jumpscope.load(text)
    assert sae.cfg.site == "layers.20.resid_post" and sae.source["commit"] == COMMIT
    assert formats.detect_format(text) == "gemma_scope"


def test_path_object_with_collapsed_slashes(gemma_scope):
    check_gemma_scope(jumpscope.load(Path(f"hf://{REPO}/{SAE_ID}")), gemma_scope)


def test_options_override_and_device_stays_positional(gemma_scope, tmp_path):
    sae = jumpscope.load(REPO, SAE_ID, "cpu", site="layers.1.resid_post", model="mine")
    assert (sae.cfg.model, sae.cfg.site) == ("mine", "layers.1.resid_post")
    jumpscope.save(sae, tmp_path / "native")
    assert jumpscope.load(tmp_path / "native", "cpu").cfg.site == "layers.1.resid_post"
    assert read_metadata(tmp_path / "native")["source"]["average_l0"] == 71  # where it came from is kept


def test_local_folder_with_sae_id(tmp_path):
    (tmp_path / "clone" / "layer_3").mkdir(parents=True)
    np.savez(tmp_path / "clone" / "layer_3" / "params.npz", **params())
    sae = jumpscope.load(tmp_path / "clone", "layer_3")
    assert sae.cfg.site is None and not hasattr(sae, "source")
    with pytest.raises(TypeError, match="revision= and cache_dir= apply to SAEs on the Hugging Face hub only"):
        jumpscope.load(tmp_path / "clone", "layer_3", revision="main")


def test_not_cached_without_network_says_how_to_download(cache):
    with pytest.raises(FileNotFoundError) as error:
        jumpscope.load(REPO, "layer_21/width_16k/average_l0_70")
    message = str(error.value)
    assert "layer_21/width_16k/average_l0_70/params.npz" in message and "not in the local Hugging Face cache" in message
    assert str(cache) in message and "allow_network=True" in message and "--allow-network" in message


def test_network_download_goes_through_hf_hub_download(cache, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, *, revision=None, cache_dir=None, local_files_only=False, **_):
        calls.append((repo_id, filename, revision, cache_dir, local_files_only))
        file = cached_file(Path(cache_dir), repo_id, filename)
        np.savez(file, **params(seed=1))
        return str(file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    sae = jumpscope.load(f"hf://{REPO}/{SAE_ID}", allow_network=True)
    assert calls == [(REPO, f"{SAE_ID}/params.npz", None, str(cache), False)]
    check_gemma_scope(sae, params(seed=1))


@pytest.mark.parametrize("repo, path, model, site", [
    ("google/gemma-scope-9b-pt-mlp", "layer_3/width_131k/average_l0_12", "google/gemma-2-9b", "layers.3.mlp_out"),
    ("google/gemma-scope-9b-it-res", "layer_31/width_16k/average_l0_76", "google/gemma-2-9b-it",
     "layers.31.resid_post"),
    ("google/gemma-scope-2b-pt-att", "layer_0/width_16k/average_l0_104", "google/gemma-2-2b", "layers.0.attn_z"),
    ("google/gemma-scope-27b-pt-res", "layer_10/width_131k/average_l0_51", "google/gemma-2-27b",
     "layers.10.resid_post"),
    ("google/gemma-scope-2b-pt-transcoders", "layer_5/width_16k/average_l0_8", "google/gemma-2-2b",
     "layers.5.mlp_in"),
])
def test_gemma_scope_names(repo, path, model, site):
    info = hub.describe(HubRef(repo, path), Path("params.npz"))
    assert (info["model"], info["site"]) == (model, site)
    assert info["width"] == path.split("/")[1][len("width_"):] and info["average_l0"] == int(path.split("_")[-1])


def test_transcoder_predicts_the_mlp_output(cache):
    np.savez(cached_file(cache, "google/gemma-scope-2b-pt-transcoders", "layer_5/width_16k/average_l0_8/params.npz"),
             **params())
    sae = jumpscope.load("hf://google/gemma-scope-2b-pt-transcoders/layer_5/width_16k/average_l0_8")
    assert (sae.cfg.site, sae.cfg.target_site, sae.cfg.d_out) == ("layers.5.mlp_in", "layers.5.mlp_out", D_IN)
    assert sae.source["transcoder"] and not sae.cfg.apply_b_dec_to_input


def test_other_repositories_and_folder_formats(cache):
    """A sparsify folder in a hub repository: cfg.json first, then its weights."""
    coder = jumpscope.build("topk", d_in=D_IN, d_sae=N, k=2)
    folder = cached_file(cache, "EleutherAI/sae-llama-3-8b-32x", "layers.3/cfg.json").parent
    jumpscope.save(coder, folder, format="sparsify")
    sae = jumpscope.load("EleutherAI/sae-llama-3-8b-32x", "layers.3")
    assert sae.architecture == "topk" and sae.cfg.site == "layers.3.resid_post" and sae.cfg.model is None
    assert sae.source["repo_id"] == "EleutherAI/sae-llama-3-8b-32x"
    x = torch.randn(8, D_IN)
    assert torch.equal(sae.encode(x), coder.encode(x))
    (folder / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"layers.3/sae.safetensors or layers.3/sae_weights.safetensors is "
                                                "not in the local Hugging Face cache"):
        jumpscope.load("hf://EleutherAI/sae-llama-3-8b-32x/layers.3")


@pytest.mark.parametrize("args, error, match", [
    (("not a repo", "x"), ValueError, "neither a local file or folder nor a Hugging Face repository id"),
    ((REPO, "../../etc"), ValueError, r"'\.\.' is not allowed"),
    (("hf://justone",), ValueError, "expected hf://owner/name/path"),
    ((f"hf://{REPO}/{SAE_ID}", "layer_1"), ValueError, "not both"),
    ((REPO, "cuda:0/x"), FileNotFoundError, "not in the local Hugging Face cache"),  # a path, not a device
])
def test_bad_references(cache, args, error, match):
    with pytest.raises(error, match=match):
        jumpscope.load(*args)


def test_pinned_revision_conflict(gemma_scope):
    with pytest.raises(ValueError, match="pins revision"):
        jumpscope.load(f"hf://{REPO}@v1/{SAE_ID}", revision="v2")


@pytest.mark.online
def test_download_a_real_gemma_scope_sae():
    """Downloads google/gemma-scope-2b-pt-res layer_20/width_16k/average_l0_71 (about 300 MB)."""
    if os.environ.get("JUMPSCOPE_ONLINE_TESTS") != "1":
        pytest.skip("downloads about 300 MB from the Hugging Face hub; set JUMPSCOPE_ONLINE_TESTS=1 to run it")
    sae = jumpscope.load(REPO, SAE_ID, allow_network=True)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (2304, 16384)
    assert (sae.cfg.model, sae.cfg.site) == ("google/gemma-2-2b", "layers.20.resid_post")
    assert torch.isfinite(sae.threshold).all() and bool((sae.threshold > 0).all())


def test_cli_info_and_convert_read_hub_references_offline(gemma_scope, tmp_path, capsys):
    from jumpscope.cli import main

    assert main(["info", f"hf://{REPO}/{SAE_ID}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["format"], report["site"], report["model"]) == ("gemma_scope", "layers.20.resid_post",
                                                                    "google/gemma-2-2b")
    assert report["metadata"]["repo_id"] == REPO
    assert main(["convert", f"hf://{REPO}/{SAE_ID}", str(tmp_path / "native"), "--to", "native"]) == 0
    assert jumpscope.load(tmp_path / "native").cfg.site == "layers.20.resid_post"
    assert main(["info", f"hf://{REPO}/layer_3/width_16k/average_l0_9"]) == 2
    assert "allow-network" in capsys.readouterr().err
