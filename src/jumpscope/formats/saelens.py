"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``).

Sources: SAELens (github decoderesearch/SAELens, formerly jbloomAus/SAELens):
sae_lens/saes/{sae,standard_sae,jumprelu_sae,gated_sae,topk_sae,batchtopk_sae,transcoder}.py,
sae_lens/loading/pretrained_sae_loaders.py, and sae_lens/sae.py for <= 5.x. Checked by
tests/test_formats_saelens_interop.py against SAELens 6.54.12 and 5.11.0, both directions.

- SAELens 6.x (``sae_lens/saes/*.py``, ``sae_lens/loading/pretrained_sae_loaders.py``): flat
  forward-pass fields (``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``device``,
  ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``k``,
  ``rescale_acts_by_decoder_norm``, ``d_out``) plus a nested ``metadata`` object (model_name,
  hook_name, hook_head_index, context_size, prepend_bos, dataset_path, sae_lens_version ...).
  A cfg whose ``sae_lens_version`` (top level or in metadata) is below 6.0.0 is converted by
  SAELens's ``handle_pre_6_0_config``; we apply the same renames and defaults.
- SAELens 3.x-5.x (``sae_lens/sae.py``): everything flat, ``activation_fn_str`` (or
  ``activation_fn``) with ``activation_fn_kwargs`` ({"k": k} for TopK), ``hook_point`` as an old
  name of ``hook_name``, ``finetuning_scaling_factor``.

``save_saelens`` writes BOTH: the 6.x layout with ``metadata.sae_lens_version = "6.0.0"`` (so
6.x loads it without the pre-6 conversion) and every field SAELens 5.x's ``SAEConfig`` requires
at the top level (5.x ignores ``metadata``; 6.x ignores fields its config classes lack).

Encoders (all SAELens versions): ``sae_in = x - b_dec * apply_b_dec_to_input`` (transcoders never
subtract), ``hidden_pre = sae_in @ W_enc + b_enc``; standard: ReLU; jumprelu:
``ReLU(pre) * (pre > threshold)`` (some 6.x: ``threshold.relu()``, the same); topk: top k of ``pre``, ReLU'd;
gated: ``(sae_in @ W_enc + b_gate > 0) * ReLU(sae_in @ (W_enc * exp(r_mag)) + b_mag)``. These
map one-to-one onto our relu / jumprelu / topk / gated SAEs (a negative jumprelu threshold is
clamped to 0, exact as in gemma_scope.py). Folded on load, equal up to float32 rounding:
``finetuning_scaling_factor`` (into W_dec rows), ``rescale_acts_by_decoder_norm`` (TopK:
W_enc, b_enc times the decoder row norms, W_dec rows divided by them), and
``normalize_activations="expected_average_only_in"`` when ``norm_scaling_factor`` is given
(SAELens's own fold: W_enc * s, W_dec / s, b_dec / s). Per-token normalisations
(``constant_norm_rescale``, ``layer_norm``) are not constants and are refused, as is
``covariance_whitening`` (its statistics are not in the folder). A ``batchtopk`` training
checkpoint (``topk_threshold``, float ``k``) loads as our BatchTopK SAE.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from ..errors import FormatError
from ..sae import registry
from ..sae.base import SAE
from ..sae.validation import MAX_SIZE, check_field_values
from ..sae.jumprelu import JumpReLUConfig, jumprelu_from_weights
from ..safeio import (check_finite, check_tensors, finite_or_none, read_json, read_safetensors, safetensors_header,
                      short, to_json, write_safetensors, write_text)
from .native import build_config, check_density, existing_sae_folder, load_state

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
CFG_LAYOUT_VERSION = "6.0.0"
SUPPORTED = ("standard", "transcoder", "jumprelu", "jumprelu_transcoder", "gated", "topk", "batchtopk")
_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_METADATA_KEYS = ("model_name", "hook_name", "hook_layer", "hook_head_index", "model_class_name", "context_size",
                  "prepend_bos", "dataset_path", "dataset_trust_remote_code", "model_from_pretrained_kwargs",
                  "exclude_special_tokens", "seqpos_slice", "neuronpedia_id", "sae_lens_version",
                  "sae_lens_training_version", "hook_name_out", "hook_head_index_out")
_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "hook_point_layer": "hook_layer",
            "activation_fn_str": "activation_fn"}


def save_saelens(sae: SAE, folder: str | Path, *, density: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` as a SAELens folder loadable by ``SAE.load_from_disk(folder)``.

    relu -> "standard" ("transcoder" with d_out), jumprelu -> "jumprelu" ("jumprelu_transcoder"),
    gated -> "gated", topk -> "topk", batchtopk -> "jumprelu" with its global threshold on every
    latent (as SAELens saves BatchTopK). ``density`` (as in save_native) becomes
    ``sparsity.safetensors`` = log10(firing frequency + 1e-10), SAELens's definition.
    ``metadata`` (e.g. context_size, dataset_path, prepend_bos, hook_head_index) is merged into
    the cfg's metadata (and the flat 5.x fields)."""
    folder = Path(folder)
    arch, tensors, fields, activation = _to_saelens(sae)
    cfg = sae.cfg
    meta = {"sae_lens_version": CFG_LAYOUT_VERSION, "sae_lens_training_version": None, "model_name": cfg.model,
            "hook_name": cfg.site, "hook_head_index": None, "context_size": None, "prepend_bos": None,
            "dataset_path": None, "model_from_pretrained_kwargs": {}, "jumpscope_version": __version__,
            "jumpscope_architecture": sae.architecture, **finite_or_none(dict(metadata or {}))}
    hook_name = meta["hook_name"] or ""
    layer = re.search(r"\.(\d+)(?:\.|$)", hook_name)
    document = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, **fields,
        "dtype": _DTYPES.get(tensors["W_enc"].dtype, "float32"), "device": "cpu",
        "normalize_activations": "none", "reshape_activations": "hook_z" if hook_name.endswith("_z") else "none",
        "metadata": meta,
        # The flat fields SAELens < 6 requires (its SAEConfig has no defaults for most of them).
        "activation_fn_str": activation[0], "activation_fn_kwargs": activation[1], "finetuning_scaling_factor": False,
        "hook_layer": int(layer.group(1)) if layer else 0, "dataset_trust_remote_code": True, "neuronpedia_id": None,
        **{key: meta[key] for key in ("model_name", "hook_head_index", "context_size", "prepend_bos", "dataset_path",
                                      "sae_lens_training_version", "model_from_pretrained_kwargs")},
        "hook_name": hook_name,
    }
    text = to_json(document, folder / CONFIG_FILE)
    sparsity = None
    if density is not None:
        counts, n_tokens = check_density(density, cfg.d_sae, "density")
        if n_tokens == 0:
            raise ValueError("density: n_tokens is 0, no firing frequency can be computed")
        sparsity = torch.log10(counts.double() / n_tokens + 1e-10).float()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS_FILE, tensors)
    if sparsity is not None:
        write_safetensors(folder / SPARSITY_FILE, {"sparsity": sparsity})
    else:
        (folder / SPARSITY_FILE).unlink(missing_ok=True)
    write_text(folder / CONFIG_FILE, text)
    return folder


def _to_saelens(sae: SAE) -> tuple[str, dict[str, Tensor], dict[str, Any], tuple[str, dict[str, Any]]]:
    """(architecture, weights, extra cfg fields, (activation_fn_str, kwargs)) in SAELens terms."""
    sae.check_no_skip("written in the SAELens format")
    cfg = sae.cfg
    name = sae.architecture
    if name == "batchtopk":  # its inference form, without BatchTopKSAE.export's b_dec fold
        threshold = sae.threshold.detach().expand(cfg.d_sae).clone()
        sae = jumprelu_from_weights(sae.W_enc.detach(), sae.W_dec.detach(), sae.b_enc.detach(), sae.b_dec.detach(),
                                    threshold, apply_b_dec_to_input=cfg.apply_b_dec_to_input)
        name = "jumprelu"
    elif name not in ("jumprelu", "relu", "gated", "topk"):
        sae = sae.export()
        name = sae.architecture
        if name not in ("jumprelu", "relu", "gated", "topk"):
            raise ValueError(f"a {name!r} SAE has no SAELens equivalent")
    transcoder = sae.cfg.d_output != sae.cfg.d_in
    names = {"relu": ("W_enc", "W_dec", "b_enc", "b_dec"), "topk": ("W_enc", "W_dec", "b_enc", "b_dec"),
             "jumprelu": ("W_enc", "W_dec", "b_enc", "b_dec"),
             "gated": ("W_enc", "W_dec", "b_gate", "r_mag", "b_mag", "b_dec")}[name]
    tensors = {key: getattr(sae, key).detach() for key in names}
    fields: dict[str, Any] = {"apply_b_dec_to_input": bool(sae.cfg.apply_b_dec_to_input)}
    activation: tuple[str, dict[str, Any]] = ("relu", {})
    if transcoder and name in ("gated", "topk"):
        raise ValueError(f"SAELens has no {name} transcoder architecture (d_out={sae.cfg.d_out} != d_in)")
    if transcoder:
        fields = {"apply_b_dec_to_input": False, "d_out": sae.cfg.d_output}
    if name == "jumprelu":
        tensors["threshold"] = sae.threshold.detach()
        if bool((tensors["threshold"] < 0).any()):
            raise ValueError("negative JumpReLU thresholds have no SAELens equivalent (its encoder applies ReLU)")
        arch = "jumprelu_transcoder" if transcoder else "jumprelu"
    elif name == "relu":
        arch = "transcoder" if transcoder else "standard"
    elif name == "topk":
        arch, activation = "topk", ("topk", {"k": sae.cfg.k})
        fields.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    else:
        arch = "gated"
    return arch, tensors, fields, activation


def read_saelens_config(folder: str | Path) -> dict[str, Any]:
    """A SAELens cfg.json (any layout) in one normalised form: architecture, d_in, d_sae, d_out,
    apply_b_dec_to_input, normalize_activations, activation_fn, k, rescale_acts_by_decoder_norm,
    finetuning_scaling_factor, reshape_activations, metadata (flat and nested fields merged)."""
    path = existing_sae_folder(folder) / CONFIG_FILE
    raw = {_RENAMES.get(key, key): value for key, value in read_json(path).items()}
    meta = {key: raw[key] for key in _METADATA_KEYS if key in raw}
    if isinstance(raw.get("metadata"), dict):
        meta.update({_RENAMES.get(key, key): value for key, value in raw["metadata"].items()})
    activation = _typed(raw, "activation_fn", str, path) or "relu"
    kwargs = _typed(raw, "activation_fn_kwargs", dict, path) or {}
    arch = _typed(raw, "architecture", str, path) or "standard"
    if arch == "standard" and activation == "topk":
        arch = "topk"
    norm = _typed(raw, "normalize_activations", (str, bool), path)
    norm = ("expected_average_only_in" if norm else "none") if isinstance(norm, bool) or norm is None else norm
    transcoder = arch in ("transcoder", "jumprelu_transcoder")
    for key in ("d_in", "d_sae", "d_out") if transcoder and "d_out" in raw else ("d_in", "d_sae"):
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
            raise FormatError(f"{path}: {key} must be a positive integer, got {short(value)} (at most {MAX_SIZE})")
    flags = {key: _typed(raw, key, bool, path) for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm",
                                                          "finetuning_scaling_factor")}
    return {"architecture": arch, "d_in": raw["d_in"], "d_sae": raw["d_sae"],
            "d_out": raw.get("d_out", raw["d_in"]) if transcoder else raw["d_in"],
            "apply_b_dec_to_input": False if transcoder else flags["apply_b_dec_to_input"] is not False,
            "normalize_activations": norm, "activation_fn": activation, "k": raw.get("k", kwargs.get("k")),
            "rescale_acts_by_decoder_norm": bool(flags["rescale_acts_by_decoder_norm"]
                                                 if flags["rescale_acts_by_decoder_norm"] is not None
                                                 else arch == "batchtopk"),
            "finetuning_scaling_factor": bool(flags["finetuning_scaling_factor"]),
            "reshape_activations": raw.get("reshape_activations") or "none", "metadata": meta}


def _typed(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    """``raw[key]`` if it is absent, null or of ``kind``; else a FormatError naming the file."""
    value = raw.get(key)
    if value is not None and not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise FormatError(f"{path}: {key} must be a {names}, got {short(value)}")
    return value


def load_saelens(folder: str | Path, device: str | torch.device = "cpu", *,
                 norm_scaling_factor: float | None = None) -> SAE:
    """Our SAE (in eval mode, float32, on ``device``) equal to the SAELens SAE in ``folder``.

    ``norm_scaling_factor``: the dataset constant of a ``normalize_activations=
    "expected_average_only_in"`` SAE (not stored in the folder); it is folded so the SAE takes
    raw activations. Pass 1.0 to take the weights as they are (what ``load_from_disk`` does)."""
    folder = existing_sae_folder(folder)
    cfg = read_saelens_config(folder)
    source = folder / WEIGHTS_FILE
    arch, d_in, d_sae, d_out = cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["d_out"]
    if arch not in SUPPORTED:
        raise FormatError(f"{folder / CONFIG_FILE}: SAELens architecture {short(arch)} is not supported "
                          f"(supported: {', '.join(SUPPORTED)})")
    if arch in ("standard", "transcoder") and cfg["activation_fn"] != "relu":
        raise FormatError(f"{folder / CONFIG_FILE}: activation_fn {short(cfg['activation_fn'])} is not supported "
                          "(a standard SAE maps onto our relu SAE only with activation_fn 'relu')")
    vector = {"standard": ("b_enc",), "transcoder": ("b_enc",), "topk": ("b_enc",), "batchtopk": ("b_enc",),
              "jumprelu": ("b_enc", "threshold"), "jumprelu_transcoder": ("b_enc", "threshold"),
              "gated": ("b_gate", "r_mag", "b_mag")}[arch]
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,), **{key: (d_sae,) for key in vector}}
    if arch == "batchtopk":
        shapes["topk_threshold"] = ()
    # the header's shapes first: nothing is read before they are known to fit the config
    known = {**shapes, "log_threshold": (d_sae,)}
    wrong = [f"{key} {shape} (expected {known[key]})" for key, (shape, _) in safetensors_header(source).items()
             if key in known and shape != known[key]]
    if wrong:
        raise FormatError(f"{source}: wrong tensor shapes: {', '.join(wrong)}")
    tensors = dict(read_safetensors(source))
    scale = _pop_scaling_factor(tensors, cfg, source)
    if "log_threshold" in tensors and "threshold" not in tensors and arch.startswith("jumprelu"):
        tensors["threshold"] = tensors.pop("log_threshold").double().exp()
    check_tensors(tensors, {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}, source)
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise FormatError(f"{source}: tensor {key!r} has dtype {value.dtype}, expected a float dtype")
    check_finite(tensors, source)
    t = {key: value.to(torch.float32) for key, value in tensors.items()}
    if scale is not None:
        t["W_dec"] = t["W_dec"] * scale.to(torch.float32)[:, None]
    if cfg["rescale_acts_by_decoder_norm"] and arch in ("topk", "batchtopk"):
        norms = t["W_dec"].norm(dim=-1)
        if bool((norms == 0).any()):
            raise FormatError(f"{source}: rescale_acts_by_decoder_norm with an all-zero decoder row cannot be folded")
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * norms, t["b_enc"] * norms, t["W_dec"] / norms[:, None]
    _fold_normalization(t, cfg["normalize_activations"], norm_scaling_factor, folder / CONFIG_FILE)
    meta = cfg["metadata"]
    common = {"model": meta.get("model_name"), "site": meta.get("hook_name")}
    try:
        check_field_values(JumpReLUConfig, common)
    except ValueError as error:
        raise FormatError(f"{folder / CONFIG_FILE}: metadata: {error}") from None
    if meta.get("hook_head_index") is not None:
        warnings.warn(f"{folder}: hook_head_index={short(meta['hook_head_index'])} is not kept (cfg.site is the raw "
                      f"hook name {short(meta.get('hook_name'))})", stacklevel=2)
    if arch.startswith("jumprelu"):
        sae = jumprelu_from_weights(t["W_enc"], t["W_dec"], t["b_enc"], t["b_dec"], t["threshold"].clamp_min(0.0),
                                    apply_b_dec_to_input=cfg["apply_b_dec_to_input"], **common)
        return sae.eval().to(device)
    ours = {"standard": "relu", "transcoder": "relu"}.get(arch, arch)
    fields = {"d_in": d_in, "d_sae": d_sae, "d_out": None if d_out == d_in else d_out,
              "apply_b_dec_to_input": cfg["apply_b_dec_to_input"], **common}
    if arch in ("topk", "batchtopk"):
        fields["k"] = _integer_k(cfg["k"], folder / CONFIG_FILE)
    if arch == "batchtopk":
        t["threshold"] = t.pop("topk_threshold")
    sae = registry.build(build_config(ours, fields, folder / CONFIG_FILE))
    return load_state(sae, t, source).eval().to(device)


def load_saelens_sparsity(folder: str | Path) -> Tensor | None:
    """The ``sparsity`` tensor (log10 feature density, (d_sae,)) or None when absent."""
    folder = existing_sae_folder(folder)
    path = folder / SPARSITY_FILE
    if not path.exists():
        return None
    tensors = read_safetensors(path)
    if set(tensors) != {"sparsity"}:
        raise FormatError(f"{path}: expected the single key 'sparsity', got {sorted(tensors)}")
    sparsity = tensors["sparsity"]
    d_sae = read_saelens_config(folder)["d_sae"] if (folder / CONFIG_FILE).exists() else None
    if sparsity.dim() != 1 or (d_sae is not None and sparsity.shape[0] != d_sae):
        raise FormatError(f"{path}: sparsity has shape {tuple(sparsity.shape)}, expected ({d_sae},)")
    return sparsity


def _pop_scaling_factor(tensors: dict[str, Tensor], cfg: dict[str, Any], source: Path) -> Tensor | None:
    """SAELens <= 5's per-latent decoder scale (``scaling_factor``/``finetuning_scaling_factor``),
    handled as ``read_sae_components_from_disk`` does: all ones is dropped."""
    scale = tensors.pop("finetuning_scaling_factor", None)
    old = tensors.pop("scaling_factor", None)
    if old is not None:
        if torch.allclose(old.float(), torch.ones_like(old.float())):
            old = None
        elif not cfg["finetuning_scaling_factor"]:
            raise FormatError(f"{source}: a scaling_factor is present but finetuning_scaling_factor is false")
    scale = old if scale is None else scale
    if scale is not None and (scale.shape != (cfg["d_sae"],) or not bool(torch.isfinite(scale).all())):
        raise FormatError(f"{source}: the finetuning scaling factor must be a finite ({cfg['d_sae']},) vector")
    return scale


def _fold_normalization(t: dict[str, Tensor], norm: str, factor: float | None, source: Path) -> None:
    if norm == "none":
        if factor is not None:
            raise FormatError(f"{source}: norm_scaling_factor given but normalize_activations is 'none'")
        return
    if norm == "covariance_whitening":
        raise FormatError(f"{source}: normalize_activations='covariance_whitening' needs the whitening statistics "
                         "(mean, matrix), which the folder does not store; fold them with SAELens's "
                         "fold_activation_whitening and save again")
    if norm != "expected_average_only_in":
        raise FormatError(f"{source}: normalize_activations={short(norm)} rescales each token by its own norm or "
                         "statistics, a non-linear map no fixed weights reproduce; it cannot be loaded")
    if factor is None:
        raise FormatError(f"{source}: normalize_activations='expected_average_only_in' means the SAE expects "
                         "activations multiplied by a dataset constant that the folder does not store; pass "
                         "norm_scaling_factor=<s> to fold it in, or 1.0 to use the weights as they are")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
        raise ValueError(f"norm_scaling_factor must be a finite positive number, got {factor!r}")
    t["W_enc"], t["W_dec"], t["b_dec"] = t["W_enc"] * factor, t["W_dec"] / factor, t["b_dec"] / factor


def _integer_k(k: Any, source: Path) -> int:
    whole = isinstance(k, int) or (isinstance(k, float) and math.isfinite(k) and k == int(k))
    if isinstance(k, bool) or not whole or not 1 <= k <= MAX_SIZE:
        raise FormatError(f"{source}: TopK k must be a positive integer, got {short(k)}")
    return int(k)
