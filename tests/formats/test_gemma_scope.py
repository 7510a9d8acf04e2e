"""Gemma Scope params.npz: SPEC 4's layout and encode, exact round trips, refusal of pickles."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from jumpscope.formats import load_gemma_scope, save_gemma_scope
from jumpscope.formats.gemma_scope import read_gemma_scope
from jumpscope.sae import registry  # importing jumpscope.sae registers every architecture
from jumpscope.sae.jumprelu import JumpReLUSAE, jumprelu_from_weights

D_IN, N = 6, 10


def dyadic(rng, shape, low=-8, high=8, step=0.25):
    """Multiples of 1/4 in a small range: every product and sum below is exact in float32,
    whatever the summation order, so numpy and torch must agree bit for bit."""
    return (rng.integers(low, high + 1, size=shape) * step).astype(np.float32)


def spec_params(seed=0, negative_thresholds=False):
    rng = np.random.default_rng(seed)
    threshold = dyadic(rng, (N,), 0, 6) + 0.125  # odd multiples of 1/8: never equal to a pre-activation
    if negative_thresholds:
        threshold[::3] = -threshold[::3]
    return {"W_enc": dyadic(rng, (D_IN, N)), "W_dec": dyadic(rng, (N, D_IN)), "b_enc": dyadic(rng, (N,)),
            "b_dec": dyadic(rng, (D_IN,)), "threshold": threshold}


def spec_encode(p, x):
    """SPEC 4, written independently in numpy."""
    pre = x @ p["W_enc"] + p["b_enc"]
    return (pre > p["threshold"]) * np.maximum(pre, 0)


def spec_decode(p, acts):
    return acts @ p["W_dec"] + p["b_dec"]


def dyadic_inputs(seed=1, n=64):
    return dyadic(np.random.default_rng(seed), (n, D_IN), -4, 4, 1.0)


def random_sae(name, **fields):
    sae = registry.build(name, d_in=D_IN, d_sae=N, **fields)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, tensor in list(sae.named_parameters()) + list(sae.named_buffers()):
            positive = key in ("threshold_raw", "threshold")
            tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.4 + 0.05 if positive
                         else torch.randn(tensor.shape, generator=g) * 0.5)
    return sae.eval()


@pytest.mark.parametrize("negative", [False, True])
def test_hand_written_npz_encodes_as_spec(tmp_path, negative):
    p = spec_params(negative_thresholds=negative)
    np.savez(tmp_path / "params.npz", **p)
    sae = load_gemma_scope(tmp_path / "params.npz", model="gemma-2-2b", site="blocks.3.hook_resid_post")
    assert isinstance(sae, JumpReLUSAE) and sae.cfg.model == "gemma-2-2b"
    assert sae.cfg.site == "blocks.3.hook_resid_post" and not sae.cfg.apply_b_dec_to_input
    x = dyadic_inputs()
    acts = sae.encode(torch.from_numpy(x)).detach()
    expected = spec_encode(p, x)
    assert np.count_nonzero(expected) > 0 and np.count_nonzero(expected == 0) > 0
    np.testing.assert_array_equal(acts.numpy(), expected)
    np.testing.assert_array_equal(sae.decode(acts).detach().numpy(), spec_decode(p, expected))


def test_negative_thresholds_are_clamped_to_zero(tmp_path):
    p = spec_params(negative_thresholds=True)
    np.savez(tmp_path / "params.npz", **p)
    sae = load_gemma_scope(tmp_path)
    assert torch.equal(sae.threshold, torch.from_numpy(np.maximum(p["threshold"], 0)))


@pytest.mark.parametrize("log_threshold", [False, True])
def test_jumprelu_round_trip_is_exact(tmp_path, log_threshold):
    # exact only without input centring (a centred SAE is written with b_enc - b_dec @ W_enc)
    sae = random_sae("jumprelu", log_threshold=log_threshold, apply_b_dec_to_input=False)
    written = save_gemma_scope(sae, tmp_path / "out")
    assert written == tmp_path / "out" / "params.npz"
    with np.load(written, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
        shapes = {key: archive[key].shape for key in archive.files}
        assert all(archive[key].dtype == np.float32 for key in archive.files)
        np.testing.assert_array_equal(archive["threshold"], sae.threshold.detach().numpy())  # raw, not log
    assert shapes == {"W_enc": (D_IN, N), "W_dec": (N, D_IN), "b_enc": (N,), "b_dec": (D_IN,), "threshold": (N,)}
    loaded = load_gemma_scope(tmp_path / "out")
    for key in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        assert torch.equal(getattr(loaded, key), getattr(sae, key)), key
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(7))
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))


def test_written_file_matches_independent_spec_implementation(tmp_path):
    p = spec_params(seed=4)
    sae = jumprelu_from_weights(*(torch.from_numpy(p[k]) for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")))
    save_gemma_scope(sae, tmp_path / "params.npz")
    with np.load(tmp_path / "params.npz", allow_pickle=False) as archive:
        written = {key: archive[key] for key in archive.files}
    x = dyadic_inputs(seed=5)
    np.testing.assert_array_equal(spec_encode(written, x), sae.encode(torch.from_numpy(x)).detach().numpy())


@pytest.mark.parametrize("name, fields", [("relu", {}), ("gated", {}), ("batchtopk", {"k": 3}),
                                          ("jumprelu", {"d_out": 4})])
def test_other_architectures_export(tmp_path, name, fields):
    sae = random_sae(name, **fields)
    save_gemma_scope(sae, tmp_path)
    loaded = load_gemma_scope(tmp_path)
    exported = sae.export()
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.encode(x), exported.encode(x))
    assert torch.equal(loaded(x), exported(x))


def test_centred_jumprelu_is_folded(tmp_path):
    sae = random_sae("jumprelu", apply_b_dec_to_input=True)
    save_gemma_scope(sae, tmp_path)
    loaded = load_gemma_scope(tmp_path)
    assert not loaded.cfg.apply_b_dec_to_input
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)


def test_topk_cannot_be_written(tmp_path):
    with pytest.raises(ValueError, match="'topk' SAE exports to 'topk'.*top-k selection"):
        save_gemma_scope(random_sae("topk", k=3), tmp_path)
    assert not (tmp_path / "params.npz").exists()


def test_negative_threshold_cannot_be_written(tmp_path):
    p = spec_params(negative_thresholds=True)
    sae = jumprelu_from_weights(*(torch.from_numpy(p[k]) for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")))
    with pytest.raises(ValueError, match="negative JumpReLU thresholds"):
        save_gemma_scope(sae, tmp_path)


def test_invalid_metadata(tmp_path):
    np.savez(tmp_path / "params.npz", **spec_params())
    with pytest.raises(ValueError, match="invalid metadata for a JumpReLU config"):
        load_gemma_scope(tmp_path, colour="blue")


class Trap:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_object_array_is_refused_not_unpickled(tmp_path):
    p = spec_params()
    trap = tmp_path / "unpickled"
    objects = np.empty(N, dtype=object)
    objects[:] = [Trap(trap)] * N
    np.savez(tmp_path / "params.npz", **{**p, "threshold": objects})
    with pytest.raises(ValueError, match=r"array 'threshold' is an object \(pickled\) array; refused"):
        load_gemma_scope(tmp_path)
    assert not trap.exists()


def test_pickle_file_is_refused_not_unpickled(tmp_path):
    trap = tmp_path / "unpickled"
    (tmp_path / "params.npz").write_bytes(pickle.dumps(Trap(trap)))
    with pytest.raises(ValueError, match="not an npz archive.*refused"):
        load_gemma_scope(tmp_path)
    assert not trap.exists()


def test_truncated_npz(tmp_path):
    np.savez(tmp_path / "params.npz", **spec_params())
    data = (tmp_path / "params.npz").read_bytes()
    (tmp_path / "params.npz").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match="params.npz is truncated"):
        load_gemma_scope(tmp_path)


def test_single_npy_is_refused(tmp_path):
    with open(tmp_path / "params.npz", "wb") as handle:
        np.save(handle, np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="single .npy array, not an npz archive"):
        load_gemma_scope(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Gemma Scope params file"):
        load_gemma_scope(tmp_path)


@pytest.mark.parametrize("change, match", [
    (lambda p: p.pop("threshold"), r"missing \['threshold'\], unexpected \[\]"),
    (lambda p: p.update(log_threshold=p["threshold"]), r"missing \[\], unexpected \['log_threshold'\]"),
    (lambda p: p.update(threshold=np.zeros(N + 1, np.float32)),
     r"inconsistent Gemma Scope shapes \(b_enc and threshold"),
    (lambda p: p.update(W_dec=np.zeros((N + 1, D_IN), np.float32)), r"W_dec has 11 rows but W_enc has 10 columns"),
    (lambda p: p.update(b_dec=np.zeros(D_IN + 1, np.float32)), r"b_dec must have shape \(6,\)"),
    (lambda p: p.update(W_enc=np.zeros(N, np.float32)), "W_enc and W_dec must be matrices"),
    (lambda p: p.update(b_enc=np.arange(N)), "array 'b_enc' has dtype int64"),
    (lambda p: p["W_enc"].__setitem__((0, 0), np.nan), "array 'W_enc' holds NaN or infinite"),
    (lambda p: p["threshold"].__setitem__(0, np.inf), "array 'threshold' holds NaN or infinite"),
])
def test_invalid_params(tmp_path, change, match):
    p = spec_params()
    change(p)
    np.savez(tmp_path / "params.npz", **p)
    with pytest.raises(ValueError, match=match):
        read_gemma_scope(tmp_path)


def test_float16_file_loads_exactly(tmp_path):
    p = spec_params()
    np.savez(tmp_path / "params.npz", **{key: value.astype(np.float16) for key, value in p.items()})
    sae = load_gemma_scope(tmp_path)
    assert sae.W_enc.dtype == torch.float32 and torch.equal(sae.W_enc, torch.from_numpy(p["W_enc"]))


# -- hostile archives: refused from the headers, before any data is decompressed ---------------
def npy_bytes(array: np.ndarray, shape=None) -> bytes:
    """An .npy file of ``array``'s data whose header declares ``shape`` (a lie, when given)."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(array.dtype),
                                                  "fortran_order": False, "shape": shape or array.shape})
    return buffer.getvalue() + array.tobytes()


def write_members(path, members: dict[str, bytes], compression=None) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w", compression or zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def members_of(p) -> dict[str, bytes]:
    return {f"{name}.npy": npy_bytes(value) for name, value in p.items()}


def test_huge_declared_shape_is_refused_before_allocating(tmp_path):
    from jumpscope.errors import FormatError

    p = spec_params()
    members = members_of(p)
    members["W_enc.npy"] = npy_bytes(p["W_enc"], shape=(100_000, 100_000))  # 37 GiB declared
    write_members(tmp_path / "params.npz", members)
    with pytest.raises(FormatError, match=r"array 'W_enc' declares shape \(100000, 100000\) .* refused") as error:
        load_gemma_scope(tmp_path)
    assert str(tmp_path / "params.npz") in str(error.value)


def test_zip_bomb_is_refused_before_decompressing(tmp_path):
    import zipfile

    from jumpscope.errors import FormatError

    p = spec_params()
    members = members_of(p)
    members["W_enc.npy"] = npy_bytes(np.zeros((D_IN, 12 << 20), np.float32))  # 288 MiB of zeros, consistent header
    write_members(tmp_path / "params.npz", members, zipfile.ZIP_DEFLATED)
    assert (tmp_path / "params.npz").stat().st_size < 2 << 20
    with pytest.raises(FormatError, match="inconsistent Gemma Scope shapes") as error:
        load_gemma_scope(tmp_path)
    assert str(tmp_path / "params.npz") in str(error.value)
    n = 4 << 20  # now every shape agrees: 4M latents, 4 x 96 MiB of zeros packed into ~400 KB
    zeros = {"W_enc": np.zeros((D_IN, n), np.float32), "W_dec": np.zeros((n, D_IN), np.float32),
             "b_enc": np.zeros(n, np.float32), "b_dec": np.zeros(D_IN, np.float32), "threshold": np.zeros(n, np.float32)}
    write_members(tmp_path / "params.npz", members_of(zeros), zipfile.ZIP_DEFLATED)
    with pytest.raises(FormatError, match="refused as a likely zip bomb"):
        load_gemma_scope(tmp_path)


@pytest.mark.parametrize("damage, match", [
    ("not_npy", "member 'threshold.npy' is not a .npy array"),
    ("zip_version", "is truncated or not a valid npz archive"),
    ("bad_header", "array 'b_dec' has an invalid .npy header"),
    ("extra_member", r"unexpected \['notes.txt'\]"),
    ("crc", "is truncated or not a valid npz archive"),
])
def test_corrupt_members_are_clean_errors(tmp_path, damage, match):
    from jumpscope.errors import FormatError

    p = spec_params()
    members = members_of(p)
    if damage == "not_npy":
        members["threshold.npy"] = b"just some bytes, not an array"
    elif damage == "bad_header":
        members["b_dec.npy"] = b"\x93NUMPY\x01\x00\x10\x00{'descr': ((((}\n"
    elif damage == "extra_member":
        members["notes.txt"] = b"hello"
    write_members(tmp_path / "params.npz", members)
    data = bytearray((tmp_path / "params.npz").read_bytes())
    if damage == "zip_version":  # every central directory entry needs zip version 99
        at = data.find(b"PK\x01\x02")
        while at >= 0:
            data[at + 6: at + 8] = (99).to_bytes(2, "little")
            at = data.find(b"PK\x01\x02", at + 4)
    elif damage == "crc":
        at = data.find(b"threshold.npy") + len("threshold.npy") + 80
        data[at] ^= 0xFF
    (tmp_path / "params.npz").write_bytes(bytes(data))
    with pytest.raises(FormatError, match=match) as error:
        load_gemma_scope(tmp_path)
    assert str(tmp_path / "params.npz") in str(error.value)


def test_symlink_to_dev_zero_is_not_a_regular_file(tmp_path):
    import jumpscope
    from jumpscope.errors import FormatError

    (tmp_path / "params.npz").symlink_to("/dev/zero")
    for path in (tmp_path, tmp_path / "params.npz"):
        with pytest.raises(FormatError, match="params.npz is not a regular file"):
            load_gemma_scope(path)
    with pytest.raises(FormatError, match="not a regular file"):
        jumpscope.load(tmp_path / "params.npz")
