"""Gemma Scope's ``params.npz`` (SPEC 4): a JumpReLU SAE taking RAW activations.

Keys: ``W_enc`` (d_in, n), ``W_dec`` (n, d_out), ``b_enc`` (n), ``b_dec`` (d_out), ``threshold``
(n, raw, not log); float32. ``d_out = d_in`` except for transcoders. Encode:
``pre = x @ W_enc + b_enc; acts = (pre > threshold) * ReLU(pre)``; decode:
``acts @ W_dec + b_dec``.

Reading (npz_safe.py) checks every member's ``.npy`` header (shape, dtype) against the zip
directory and the shapes against each other before decompressing any data, and never unpickles:
an archive holding an object array is refused. Writing goes through ``np.savez`` (numeric arrays are stored as raw
``.npy`` members, no pickles) into a temp file that is fsynced and renamed into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FormatError
from ..sae.base import SAE
from ..sae.validation import check_field_values
from ..sae.jumprelu import JumpReLUConfig, JumpReLUSAE, jumprelu_from_weights
from ..safeio import atomic_write
from .npz_safe import read_npz

PARAMS_FILE = "params.npz"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def params_path(path: str | Path) -> Path:
    """``path`` itself if it names a ``.npz`` file, else ``path / "params.npz"``."""
    path = Path(path)
    return path if path.suffix == ".npz" else path / PARAMS_FILE


def save_gemma_scope(sae: SAE, path: str | Path) -> Path:
    """Write ``sae.export()`` as a Gemma Scope ``params.npz``; returns the file written.

    ``path`` is the ``.npz`` file or a folder (``params.npz`` is written inside). The export
    must be a JumpReLU SAE (JumpReLU, ReLU, Gated and BatchTopK SAEs are). A JumpReLU SAE that
    subtracts ``b_dec`` from its input is written with ``b_enc - b_dec @ W_enc`` (the format
    has no input centring; equal up to float32 rounding of that bias, as in ``ReLUSAE.export``).
    """
    exported = sae.export()
    if not isinstance(exported, JumpReLUSAE):
        raise ValueError(
            f"a {sae.architecture!r} SAE exports to {exported.architecture!r}, which Gemma Scope's params.npz "
            "cannot represent: the format is a JumpReLU with one fixed threshold per latent, and a per-token "
            "top-k selection (TopK) is not a fixed threshold; save it in the native or SAELens format instead")
    with torch.no_grad():
        threshold = exported.threshold.detach()
        if bool((threshold < 0).any()):
            raise ValueError("negative JumpReLU thresholds cannot be written to Gemma Scope params.npz: its "
                             "encode applies ReLU, ours would pass negative pre-activations above them")
        b_enc = exported.b_enc.detach()
        if exported.cfg.apply_b_dec_to_input:
            b_enc = b_enc - exported.b_dec.detach() @ exported.W_enc.detach()
        tensors = {"W_enc": exported.W_enc, "W_dec": exported.W_dec, "b_enc": b_enc,
                   "b_dec": exported.b_dec, "threshold": threshold}
        arrays = {name: value.detach().to("cpu", torch.float32).contiguous().numpy() for name, value in tensors.items()}
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            raise ValueError(f"cannot write Gemma Scope params: {name!r} holds NaN or infinite values")
    target = params_path(path)

    def write(temp: str) -> None:
        with open(temp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(target, write)
    return target


def read_gemma_scope(path: str | Path) -> dict[str, np.ndarray]:
    """The validated float32 arrays of a ``params.npz`` (file or folder holding it)."""
    file = params_path(path)
    if not file.exists():
        raise FileNotFoundError(f"no Gemma Scope params file at {file}")
    arrays = read_npz(file, KEYS, lambda headers: _check_shapes({k: h[0] for k, h in headers.items()}, file))
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            raise FormatError(f"{file}: array {name!r} holds NaN or infinite values")
    return {name: array.astype(np.float32) for name, array in arrays.items()}  # a copy: writable, native order


def load_gemma_scope(path: str | Path, **metadata: Any) -> JumpReLUSAE:
    """A JumpReLU SAE equal to SPEC 4's encode/decode of this ``params.npz``.

    ``metadata``: JumpReLU config fields such as ``model=`` and ``site=``. Negative thresholds
    are clamped to 0, which is exact: SPEC 4 gives ``(pre > t) * ReLU(pre)``, ours gives
    ``pre * (pre > t)``; for t >= 0 both are ``pre`` where ``pre > t`` and 0 elsewhere; for t < 0
    the ReLU zeroes ``pre`` in (t, 0], so SPEC 4 gives ``ReLU(pre) = pre * (pre > 0)``, which is
    ours with t = 0.
    """
    try:
        check_field_values(JumpReLUConfig, metadata)
    except ValueError as error:
        raise ValueError(f"invalid metadata for a JumpReLU config: {error}") from None
    arrays = read_gemma_scope(path)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in arrays.items()}
    threshold = tensors["threshold"].clamp_min(0.0)
    try:
        sae = jumprelu_from_weights(tensors["W_enc"], tensors["W_dec"], tensors["b_enc"], tensors["b_dec"],
                                    threshold, **metadata)
    except TypeError as error:
        raise ValueError(f"invalid metadata for a JumpReLU config: {error}") from None
    return sae.eval()


def _check_shapes(shapes: dict[str, tuple[int, ...]], file: Path) -> None:
    problem = None
    if len(shapes["W_enc"]) != 2 or len(shapes["W_dec"]) != 2:
        problem = "W_enc and W_dec must be matrices"
    else:
        d_in, n = shapes["W_enc"]
        n_dec, d_out = shapes["W_dec"]
        if min(d_in, n, d_out) == 0:
            problem = "empty dimensions"
        elif n_dec != n:
            problem = f"W_dec has {n_dec} rows but W_enc has {n} columns"
        elif shapes["b_enc"] != (n,) or shapes["threshold"] != (n,):
            problem = f"b_enc and threshold must have shape ({n},)"
        elif shapes["b_dec"] != (d_out,):
            problem = f"b_dec must have shape ({d_out},)"
    if problem:
        listing = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise FormatError(f"{file}: inconsistent Gemma Scope shapes ({problem}): {listing}")
