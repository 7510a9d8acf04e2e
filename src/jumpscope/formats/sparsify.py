"""EleutherAI sparsify folders: ``cfg.json`` + ``sae.safetensors`` (TopK SAEs and transcoders).

Sources: EleutherAI/sparsify ``sparsify/sparse_coder.py``, ``sparsify/config.py``,
``sparsify/fused_encoder.py``, ``sparsify/trainer.py``, and its predecessor EleutherAI/sae
(``sae/sae.py``, ``sae/config.py``), which wrote the same layout.

- ``cfg.json``: the coder config plus ``d_in``: ``num_latents`` (0 means ``d_in *
  expansion_factor``), ``k``, ``normalize_decoder``, ``multi_topk``, ``skip_connection``,
  ``transcode``, ``activation`` ("topk" or "groupmax"), in some versions ``signed``,
  ``embed_skip``, ``gram_lookup``.
- ``sae.safetensors``: ``encoder.weight`` (num_latents, d_in) and ``encoder.bias``
  (num_latents) of an ``nn.Linear``, ``W_dec`` (num_latents, d_in), ``b_dec`` (d_in), and
  ``W_skip`` (d_in, d_in) when ``skip_connection``; float32 or bfloat16.
- Encode: ``pre = ReLU((x - b_dec) @ encoder.weight.T + encoder.bias)`` (a transcoder does
  not subtract ``b_dec``), then the top ``k`` of ``pre``; decode: ``acts @ W_dec + b_dec``,
  plus ``x @ W_skip.T`` (x raw) with a skip connection.

That is our ``topk`` SAE with ``W_enc = encoder.weight.T``, ``W_skip = W_skip.T`` and
``apply_b_dec_to_input = not transcode``: sparsify applies ReLU before the top-k and we after
it, and both keep every positive pre-activation among the k largest and zero the rest (when
fewer than k are positive, sparsify's extra picks are zeros and ours are ReLU'd negatives,
also zeros). Only exact ties at the k-th value may be broken differently. ``multi_topk`` is a
training loss and does not change inference. ``embed_skip`` (a term from another site's
activations), ``signed`` (top-k of |pre|, no ReLU), ``gram_lookup`` (a per-n-gram table
outside the folder) and ``groupmax`` have no equivalent and are refused, naming the field.

sparsify names a coder's folder after its hookpoint, a module path relative to the model's
base model (``layers.6``, ``h.6``, ``layers.6.mlp``); the run folder above it holds the
training ``config.json`` with the ``model``. Both are mapped onto our config where we can.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError
from ..sae import registry
from ..sae.base import SAE
from ..sae.validation import MAX_SIZE
from ..safeio import (check_finite, check_header, check_tensors, read_json, read_safetensors, short, to_json,
                      write_safetensors, write_text)
from .native import build_config, existing_sae_folder, load_state

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
# Fields that must hold these values for the coder to be a TopK SAE (or transcoder) of ours.
_REFUSED = {"embed_skip": False, "signed": False, "gram_lookup": False, "activation": "topk"}
_WHY = {"embed_skip": "an affine skip term from the embedding activations, another site",
        "signed": "top-k of |pre-activation| with signed, un-ReLU'd activations",
        "gram_lookup": "an n-gram mean table (stored outside the folder) subtracted from the target",
        "activation": "a per-group max instead of a top-k"}
# Fields that only matter to training, or that are read below.
_KNOWN = {"d_in", "k", "num_latents", "expansion_factor", "normalize_decoder", "multi_topk", "transcode",
          "skip_connection",
          "lookup_max_order", "gram_table_hash", "naive_decoder", "d_sae", "dtype", *_REFUSED}
_HOOKPOINT = re.compile(r"^(?:(?:model|transformer|gpt_neox)\.)?(?:layers|h|encoder\.layer|decoder\.layers)"
                        r"\.(\d+)(?:\.([\w.]+))?$")
# Modules whose output is what the MLP / attention adds to the residual stream (llama, GPT-2, GPT-NeoX).
_MLP = ("mlp", "mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h")
_ATTENTION = ("self_attn", "attention", "attn", "self_attn.o_proj", "attn.c_proj", "attention.dense")


def is_sparsify_config(document: dict[str, Any]) -> bool:
    """Whether a parsed ``cfg.json`` is sparsify's (``d_in`` and ``k``, and no ``architecture``
    or ``config``, which our native cfg.json and SAELens 6.x have)."""
    return "d_in" in document and "k" in document and "architecture" not in document and "config" not in document


def read_sparsify_config(folder: str | Path) -> dict[str, Any]:
    """The validated ``cfg.json`` of a sparsify folder as ``{"d_in", "num_latents", "k",
    "transcode", "skip_connection", "normalize_decoder", "multi_topk"}``; a field we cannot
    represent is a ValueError naming it."""
    path = existing_sae_folder(folder) / CONFIG_FILE
    raw = read_json(path)
    if not is_sparsify_config(raw):
        raise FormatError(f"{path} is not a sparsify config: it needs 'd_in' and 'k' (and 'num_latents' or "
                         f"'expansion_factor') and no 'architecture'; found keys {short(sorted(raw), 200)}")
    for name, plain in _REFUSED.items():
        if name in raw and raw[name] != plain:
            raise FormatError(f"{path}: {name}={short(raw[name])} is not supported: it means {_WHY[name]}, which our "
                             f"TopK SAE cannot represent (only {name}={plain!r} loads)")
    unknown = sorted(key for key in set(raw) - _KNOWN if raw[key] not in (None, False, 0, "", [], {}))
    if unknown:
        raise FormatError(f"{path}: unknown sparsify config field(s) {short(unknown, 200)} with non-default values; they may "
                         "change the forward pass, so the folder is not loaded")
    d_in = _positive_int(raw, "d_in", path)
    k = _positive_int(raw, "k", path)
    num_latents = raw.get("num_latents") or 0
    if num_latents:
        num_latents = _positive_int(raw, "num_latents", path)
    elif raw.get("d_sae"):  # the first EleutherAI/sae releases stored the width as d_sae
        num_latents = _positive_int(raw, "d_sae", path)
    else:
        num_latents = d_in * _positive_int({"expansion_factor": raw.get("expansion_factor", 32)},
                                           "expansion_factor", path)
    if num_latents > MAX_SIZE:
        raise FormatError(f"{path}: {num_latents} latents (d_in times expansion_factor) is more than {MAX_SIZE}")
    if k > num_latents:
        raise FormatError(f"{path}: k={k} exceeds the number of latents {num_latents}")
    flags = {name: raw.get(name, default) for name, default in
             (("transcode", False), ("skip_connection", False), ("normalize_decoder", True),
              ("multi_topk", False))}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise FormatError(f"{path}: {name} must be true or false, got {short(value)}")
    return {"d_in": d_in, "num_latents": num_latents, "k": k, **flags}


def load_sparsify(folder: str | Path, device: str | torch.device = "cpu", *, model: str | None = None,
                  site: str | None = None, target_site: str | None = None) -> SAE:
    """Our ``topk`` SAE (eval mode, float32, on ``device``) computing what the sparsify coder in
    ``folder`` computes. ``model``, ``site`` and (transcoders) ``target_site`` default to what
    the folder names tell (:func:`run_model`, :func:`sparsify_sites`)."""
    folder = existing_sae_folder(folder)
    cfg = read_sparsify_config(folder)
    source = folder / WEIGHTS_FILE
    d_in, n = cfg["d_in"], cfg["num_latents"]
    shapes = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,),
              **({"W_skip": (d_in, d_in)} if cfg["skip_connection"] else {})}
    check_header(source, shapes)  # the header's shapes before any data is read or anything built
    tensors = read_safetensors(source)
    check_tensors(tensors, {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}, source)
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise FormatError(f"{source}: tensor {key!r} has dtype {value.dtype}, expected a float dtype")
    check_finite(tensors, source)
    t = {key: value.to(torch.float32) for key, value in tensors.items()}  # bf16/fp16 -> fp32 is exact
    model = model if model is not None else run_model(folder)
    named_site, named_target = sparsify_sites(_hookpoint(folder), cfg["transcode"], model)
    transcode = cfg["transcode"]
    fields = {"d_in": d_in, "d_sae": n, "k": cfg["k"], "d_out": d_in if transcode else None,
              "apply_b_dec_to_input": not transcode, "normalize_decoder": cfg["normalize_decoder"],
              "skip_connection": cfg["skip_connection"], "model": model,
              # sparsify trains on raw activations; keep that if this SAE is trained further here
              "input_scaling": "none", "site": site if site is not None else named_site,
              "target_site": target_site if target_site is not None else named_target}
    sae = registry.build(build_config("topk", fields, folder / CONFIG_FILE))
    weights = {"W_enc": t["encoder.weight"].T.contiguous(), "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"], **({"W_skip": t["W_skip"].T.contiguous()} if "W_skip" in t else {})}
    return load_state(sae, weights, source).eval().to(device)


def save_sparsify(sae: SAE, folder: str | Path) -> Path:
    """Write a ``topk`` SAE (or transcoder, with or without a skip connection) as a sparsify
    folder (``SparseCoder.load_from_disk`` reads it); returns the folder. Name the folder after
    the hookpoint (``layers.6`` for ``layers.6.resid_post``, see :func:`sparsify_hookpoint`):
    sparsify keeps no model or site.

    An SAE that does not subtract ``b_dec`` from its input is written with
    ``b_enc + b_dec @ W_enc`` (sparsify always subtracts it; equal up to float32 rounding of that
    bias). A transcoder must predict a tensor as wide as its input (sparsify has one ``d_in``)."""
    if sae.architecture != "topk":
        raise ValueError(f"a {sae.architecture!r} SAE cannot be written in sparsify's format, which holds TopK "
                         "SAEs only (a per-token top-k of ReLU'd pre-activations); save it in the native or "
                         "SAELens format instead")
    cfg = sae.cfg
    transcode = cfg.d_out is not None or cfg.target_site is not None
    if transcode and (cfg.d_output != cfg.d_in or cfg.apply_b_dec_to_input):
        raise ValueError(f"sparsify transcoders read and predict tensors of one width d_in without centring the "
                         f"input; this one has d_in={cfg.d_in}, d_out={cfg.d_output}, "
                         f"apply_b_dec_to_input={cfg.apply_b_dec_to_input}")
    with torch.no_grad():
        W_enc, b_enc, b_dec = sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach()
        if not transcode and not cfg.apply_b_dec_to_input:
            b_enc = b_enc + b_dec @ W_enc  # cancels sparsify's subtraction of b_dec
        tensors = {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "W_dec": sae.W_dec.detach(), "b_dec": b_dec}
        if sae.W_skip is not None:
            tensors["W_skip"] = sae.W_skip.detach().T  # sparsify adds x @ W_skip.T
        tensors = {key: value.to("cpu", torch.float32) for key, value in tensors.items()}
    check_finite(tensors, "the SAE to write")
    document: dict[str, Any] = {"activation": "topk", "normalize_decoder": bool(cfg.normalize_decoder),
                                "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False,
                                "skip_connection": sae.W_skip is not None, "transcode": transcode, "d_in": cfg.d_in}
    if cfg.d_sae % cfg.d_in == 0:  # informative only: a non-zero num_latents takes precedence
        document["expansion_factor"] = cfg.d_sae // cfg.d_in
    folder = Path(folder)
    hookpoint = sparsify_hookpoint(cfg.target_site or cfg.site)
    if cfg.site and hookpoint != folder.name:
        warnings.warn(f"sparsify keeps no site: name the folder {hookpoint or 'after the hookpoint'} (not "
                      f"{folder.name!r}) so that site {cfg.site!r} is read back from it", stacklevel=3)
    text = to_json(document, folder / CONFIG_FILE)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS_FILE, tensors)
    write_text(folder / CONFIG_FILE, text)
    return folder


def sparsify_sites(hookpoint: str | None, transcode: bool, model: str | None = None) -> tuple[str | None, str | None]:
    """Our ``(site, target_site)`` for a sparsify hookpoint (``target_site`` None for an SAE).

    ``layers.N`` (``h.N``, ``encoder.layer.N``: the block) -> ``layers.N.resid_post`` (a
    transcoder reads ``resid_pre``); ``layers.N.mlp`` or its output projection ->
    ``layers.N.mlp_out`` (a transcoder on ``layers.N.mlp`` reads ``layers.N.mlp_in``);
    ``layers.N.self_attn``/``attention``/``attn`` or their output projections ->
    ``layers.N.attn_out``. For Gemma 2/3 models the MLP and attention modules' outputs come
    before the post-norms that our ``mlp_out``/``attn_out`` include, so those stay raw. A
    hookpoint without a site of ours is kept as it is (in both places for a transcoder)."""
    raw = (hookpoint, hookpoint if transcode else None)
    match = _HOOKPOINT.match(hookpoint or "")
    if not match:
        return raw
    layer, module = f"layers.{match.group(1)}", match.group(2)
    post_norms = bool(model and re.search(r"gemma-?[23]", model.lower()))
    if module is None:
        return (f"{layer}.resid_pre", f"{layer}.resid_post") if transcode else (f"{layer}.resid_post", None)
    if module == "mlp" and transcode:
        return f"{layer}.mlp_in", hookpoint if post_norms else f"{layer}.mlp_out"
    if module in _MLP and not transcode and not post_norms:
        return f"{layer}.mlp_out", None
    if module in _ATTENTION and not transcode and not post_norms:
        return f"{layer}.attn_out", None
    return raw


def sparsify_hookpoint(site: str | None) -> str | None:
    """The conventional sparsify folder name for the site an SAE reconstructs or a transcoder
    predicts (the inverse of :func:`sparsify_sites` for the llama family), or None."""
    match = re.fullmatch(r"(layers\.\d+)\.(resid_post|mlp_out|attn_out)", site or "")
    if not match:
        return None
    layer, kind = match.groups()
    return {"resid_post": layer, "mlp_out": f"{layer}.mlp", "attn_out": f"{layer}.self_attn"}[kind]


def run_model(folder: Path) -> str | None:
    """The ``model`` of the sparsify training run ``folder`` belongs to, from the run folder's
    ``config.json`` (the parent; the grandparent for ``<hookpoint>/seedN``), else None."""
    folder = folder.resolve()
    run = folder.parent.parent if re.fullmatch(r"seed\d+", folder.name) else folder.parent
    config = run / "config.json"
    if not config.is_file():
        return None
    try:
        model = read_json(config).get("model")
    except (OSError, ValueError):  # the run's config is a hint only: the coder loads without it
        return None
    return model if isinstance(model, str) and model else None


def _hookpoint(folder: Path) -> str | None:
    name = folder.resolve().name
    if re.fullmatch(r"seed\d+", name):  # several seeds: <run>/<hookpoint>/seedN
        name = folder.resolve().parent.name
    return name or None


def _positive_int(raw: dict[str, Any], key: str, path: Path | str) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
        raise FormatError(f"{path}: {key} must be a positive integer, got {short(value)} (at most {MAX_SIZE})")
    return value

