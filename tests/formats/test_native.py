"""Native folder format: exact round trips for every architecture, validation, atomic writes,
and the format-detecting load/save front door."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import jumpscope
from jumpscope import formats
from jumpscope.formats import load_density, load_native, read_metadata, save_native
from jumpscope.sae import registry  # importing jumpscope.sae registers every architecture

D_IN, D_SAE = 8, 16

CASES = {
    "jumprelu": dict(),
    "jumprelu_log": dict(log_threshold=True),
    "jumprelu_centred": dict(apply_b_dec_to_input=True),
    "jumprelu_transcoder": dict(d_out=5),
    "relu": dict(),
    "relu_centred": dict(apply_b_dec_to_input=True),
    "gated": dict(),
    "topk": dict(k=3),
    "batchtopk": dict(k=3),
}


def randomize(sae: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Distinct non-trivial values in every tensor; thresholds positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(sae.named_parameters()) + list(sae.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if name in ("threshold_raw", "threshold"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.4 + 0.05)
            elif name == "log_threshold":
                tensor.copy_((torch.rand(tensor.shape, generator=g) * 0.4 + 0.05).log())
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.5)
    return sae


def make(case: str, seed: int = 0):
    name = case.split("_")[0]
    return randomize(registry.build(name, d_in=D_IN, d_sae=D_SAE, model="m", site="blocks.1.hook_resid_post",
                                    **CASES[case]), seed).eval()


def inputs(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_exact(tmp_path, case):
    sae = make(case)
    save_native(sae, tmp_path / "sae")
    loaded = load_native(tmp_path / "sae")
    assert type(loaded) is type(sae)
    assert loaded.cfg == sae.cfg
    original, restored = sae.state_dict(), loaded.state_dict()
    assert sorted(original) == sorted(restored)
    for key in original:
        assert restored[key].dtype == original[key].dtype
        assert torch.equal(restored[key], original[key]), key
    x = inputs()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))
    assert not loaded.training


def test_files_and_config_document(tmp_path):
    sae = make("jumprelu")
    save_native(sae, tmp_path, metadata={"input_scale": 2.5, "tokens_trained": 1000})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae.safetensors"]  # no temp files left
    document = json.loads((tmp_path / "cfg.json").read_text())
    assert document["format_version"] == 1
    assert document["architecture"] == "jumprelu"
    assert document["jumpscope_version"] == jumpscope.__version__
    assert document["config"]["d_sae"] == D_SAE and document["config"]["model"] == "m"
    assert read_metadata(tmp_path) == {"input_scale": 2.5, "tokens_trained": 1000}
    tensors = load_file(tmp_path / "sae.safetensors")
    assert set(tensors) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold_raw"}
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_density_round_trip_and_stale_file_removed(tmp_path):
    sae = make("relu")
    counts = torch.arange(D_SAE, dtype=torch.int64) * 3
    save_native(sae, tmp_path, density={"firing_counts": counts, "n_tokens": 100})
    density = load_density(tmp_path)
    assert density["n_tokens"] == 100 and torch.equal(density["firing_counts"], counts)
    save_native(sae, tmp_path)
    assert load_density(tmp_path) is None
    assert not (tmp_path / "feature_density.safetensors").exists()


@pytest.mark.parametrize("density, match", [
    ({"firing_counts": torch.full((D_SAE,), 5, dtype=torch.int64), "n_tokens": 4}, r"\[0, n_tokens=4\]"),
    ({"firing_counts": torch.zeros(D_SAE + 1, dtype=torch.int64), "n_tokens": 4}, "d_sae=16"),
    ({"firing_counts": torch.zeros(D_SAE), "n_tokens": 4}, "int64"),
    ({"firing_counts": torch.zeros(D_SAE, dtype=torch.int64)}, "exactly 'firing_counts' and 'n_tokens'"),
])
def test_invalid_density_is_refused(tmp_path, density, match):
    with pytest.raises(ValueError, match=match):
        save_native(make("relu"), tmp_path, density=density)


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    sae = make("jumprelu")
    save_native(sae, tmp_path)
    before = (tmp_path / "sae.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("jumpscope.safeio.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_native(make("jumprelu", seed=5), tmp_path)
    assert (tmp_path / "sae.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae.safetensors"]
    assert torch.equal(load_native(tmp_path).W_enc, sae.W_enc)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_native(tmp_path / "nowhere")


def edit_config(folder, **changes):
    document = json.loads((folder / "cfg.json").read_text())
    document.update(changes)
    (folder / "cfg.json").write_text(json.dumps(document))


def test_invalid_json(tmp_path):
    save_native(make("relu"), tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json is not valid JSON"):
        load_native(tmp_path)


def test_unknown_architecture(tmp_path):
    save_native(make("relu"), tmp_path)
    edit_config(tmp_path, architecture="nope")
    with pytest.raises(ValueError, match="unknown SAE architecture 'nope'"):
        load_native(tmp_path)


def test_newer_format_version(tmp_path):
    save_native(make("relu"), tmp_path)
    edit_config(tmp_path, format_version=99)
    with pytest.raises(ValueError, match="newer jumpscope"):
        load_native(tmp_path)


def test_invalid_config_field(tmp_path):
    save_native(make("relu"), tmp_path)
    document = json.loads((tmp_path / "cfg.json").read_text())
    edit_config(tmp_path, config={**document["config"], "bogus": 1})
    with pytest.raises(ValueError, match="invalid 'relu' config.*bogus"):
        load_native(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_file(tmp_path, damage):
    save_native(make("jumprelu"), tmp_path)
    path = tmp_path / "sae.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 50, "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"sae\.safetensors is truncated or not a valid safetensors file"):
        load_native(tmp_path)


def rewrite_weights(folder, change):
    tensors = load_file(folder / "sae.safetensors")
    change(tensors)
    save_file(tensors, folder / "sae.safetensors")


@pytest.mark.parametrize("change, match", [
    (lambda t: t.pop("b_dec"), r"missing keys \['b_dec'\], unexpected keys \[\]"),
    (lambda t: t.update(extra=torch.zeros(3)), r"missing keys \[\], unexpected keys \['extra'\]"),
    (lambda t: t.update(W_enc=torch.zeros(D_IN, D_SAE + 1)),
     r"wrong tensor shapes: W_enc \(8, 17\) \(expected \(8, 16\)\)"),
    (lambda t: t.update(b_enc=t["b_enc"].double()), "wrong tensor dtypes: b_enc torch.float64"),
    (lambda t: t["W_dec"].__setitem__((0, 0), math.nan), "'W_dec' holds 1 NaN or infinite"),
    (lambda t: t["threshold_raw"].__setitem__(2, math.inf), "'threshold_raw' holds 1 NaN or infinite"),
])
def test_invalid_weights(tmp_path, change, match):
    save_native(make("jumprelu"), tmp_path)
    rewrite_weights(tmp_path, change)
    with pytest.raises(ValueError, match=match):
        load_native(tmp_path)


def test_missing_weights_file(tmp_path):
    save_native(make("relu"), tmp_path)
    (tmp_path / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing sae.safetensors"):
        load_native(tmp_path)


def test_metadata_non_finite_floats_become_null_and_bad_values_write_nothing(tmp_path):
    save_native(make("relu"), tmp_path, metadata={"final_metrics": {"fvu": float("nan"), "l0": 3.0}})
    assert read_metadata(tmp_path) == {"final_metrics": {"fvu": None, "l0": 3.0}}
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="not plain finite JSON"):
        save_native(make("relu", seed=3), tmp_path, metadata={"input_scale": torch.tensor(2.0)})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# -- the format-detecting front door ----------------------------------------------------------

def test_detect_format_and_generic_load(tmp_path):
    sae = make("jumprelu")
    formats.save(sae, tmp_path / "native")
    formats.save(sae, tmp_path / "lens", format="saelens")
    npz = formats.save(sae, tmp_path / "scope", format="gemma_scope")
    assert formats.detect_format(tmp_path / "native") == "native"
    assert formats.detect_format(tmp_path / "lens") == "saelens"
    assert formats.detect_format(tmp_path / "scope") == "gemma_scope"
    assert formats.detect_format(npz) == "gemma_scope"
    x = inputs()
    for folder in ("native", "lens"):
        assert torch.equal(formats.load(tmp_path / folder).encode(x), sae.encode(x)), folder
    # Gemma Scope has no input centring: b_dec is folded into b_enc, equal up to float32 rounding
    torch.testing.assert_close(formats.load(tmp_path / "scope").encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    assert formats.FORMATS == ("native", "gemma_scope", "saelens", "sparsify")


def test_detect_format_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no known SAE files \(found: \['notes.txt'\]\)"):
        formats.detect_format(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        formats.detect_format(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown SAE format 'onnx'"):
        formats.save(make("relu"), tmp_path / "x", format="onnx")
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(ValueError, match="only a Gemma Scope .npz"):
        formats.detect_format(tmp_path / "a.npy")


# -- hostile files: a clear FormatError naming the file, before anything large is allocated -----
def hostile(tmp_path, **config):
    save_native(make("relu"), tmp_path)
    document = json.loads((tmp_path / "cfg.json").read_text())
    edit_config(tmp_path, config={**document["config"], **config})
    return tmp_path


@pytest.mark.parametrize("config, match", [
    (dict(d_in=46341, d_sae=46341), r"wrong tensor shapes: .*\(expected \(46341, 46341\)\)"),
    (dict(d_sae=10**9), r"wrong tensor shapes: .*\(expected \(8, 1000000000\)\)"),
    (dict(d_sae=10**12), r"d_sae must be a positive integer, got 1000000000000 \(at most"),
    (dict(seed=1.5), "seed must be an integer, got 1.5"),
    (dict(seed="0"), "seed must be an integer, got '0'"),
    (dict(d_in=True), "d_in must be an integer, got True"),
    (dict(lr=[1]), r"lr must be a number, got \[1\]"),
    (dict(normalize_decoder=1), "normalize_decoder must be true or false, got 1"),
    (dict(input_scaling="fancy"), r"input_scaling must be one of \['unit_mean_sq_norm'"),
    (dict(model={"a": 1}), r"model must be a string, got \{.a.: 1\}"),
])
def test_hostile_config_values_are_refused_naming_the_file(tmp_path, config, match):
    from jumpscope.errors import FormatError

    folder = hostile(tmp_path, **config)
    with pytest.raises(FormatError, match=match) as error:
        formats.load(folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


def test_deeply_nested_or_huge_cfg_json_is_refused(tmp_path):
    from jumpscope.errors import FormatError

    save_native(make("relu"), tmp_path)
    (tmp_path / "cfg.json").write_text('{"config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(FormatError, match="cfg.json is not valid JSON") as error:
        load_native(tmp_path)
    assert str(tmp_path / "cfg.json") in str(error.value)
    (tmp_path / "cfg.json").write_text(" " * (9 << 20) + "{}")
    with pytest.raises(FormatError, match=r"cfg.json is \d+ bytes, more than the \d+ bytes"):
        load_native(tmp_path)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder"])
def test_a_path_that_is_not_a_regular_file_is_refused_without_opening_it(tmp_path, kind):
    import os

    from jumpscope.errors import FormatError

    save_native(make("relu"), tmp_path / "sae")
    weights = tmp_path / "sae" / "sae.safetensors"
    weights.unlink()
    if kind == "fifo":
        os.mkfifo(weights)  # opening it would block forever
    elif kind == "dev_zero":
        weights.symlink_to("/dev/zero")
    else:
        weights.mkdir()
    with pytest.raises(FormatError, match="sae.safetensors is not a regular file") as error:
        formats.load(tmp_path / "sae")
    assert str(weights) in str(error.value)
    os.mkfifo(tmp_path / "params.npz")
    with pytest.raises(FormatError, match="not a regular file"):
        formats.load(tmp_path / "params.npz")
