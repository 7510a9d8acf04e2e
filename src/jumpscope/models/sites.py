"""One hook-site naming scheme across transformer families; the only place that knows module paths.

Names (``L`` counts from 0):

- ``embed``: the residual stream entering layer 0 (embeddings after any scaling, position
  embeddings, LayerNorm and dropout the model applies before its first layer);
- ``layers.{L}.resid_pre``: the residual stream entering layer ``L``;
- ``layers.{L}.resid_post``: the residual stream leaving layer ``L`` (before any final norm);
- ``layers.{L}.attn_z``: the concatenated head outputs before the attention output projection
  (d = n_heads * head_dim: Gemma Scope's "att" site);
- ``layers.{L}.attn_out``: the attention output as added to the residual stream;
- ``layers.{L}.mlp_in``: the MLP's input after its norm (what a transcoder reads);
- ``layers.{L}.mlp_out``: the MLP output as added to the residual stream (Gemma Scope's "mlp");
- ``module:{dotted.path}``: the output of any submodule (the first element when it returns a
  tuple); ``module:{dotted.path}:input`` its first positional input. Paths are relative to the
  model object given (see ``model.named_modules()``).

Families (from ``model.config.model_type``; a model with or without its head works, since paths
are taken relative to ``model.base_model``; in(m) is m's first input, read with a forward pre-hook
whether it is passed positionally or as a keyword, out(m) m's output, its first element if a tuple):

- llama:    layers[L];        attn_z = in(self_attn.o_proj);  attn_out = out(self_attn);
            mlp_in = in(mlp);  mlp_out = out(mlp)
- gemma2:   layers[L];        attn_z = in(self_attn.o_proj);  attn_out = out(post_attention_layernorm);
            mlp_in = in(mlp);  mlp_out = out(post_feedforward_layernorm)
- gpt2:     h[L];             attn_z = in(attn.c_proj);  attn_out = out(attn);
            mlp_in = in(mlp);  mlp_out = out(mlp)
- gpt_neox: layers[L];        attn_z = in(attention.dense);  attn_out = out(attention);
            mlp_in = in(mlp);  mlp_out = out(mlp)
- bert:     encoder.layer[L]; attn_z = in(attention.output.dense);  attn_out = out(attention.output.dense);
            mlp_in = in(intermediate);  mlp_out = out(output.dense)

llama covers llama, mistral, qwen2, qwen3 and gemma; gemma2 covers gemma2 and gemma3_text (their
post-norms are applied to the attention/MLP outputs before the residual add, and ``mlp``'s input
is ``pre_feedforward_layernorm``'s output); bert covers bert, roberta and xlm-roberta (post-LN:
``attn_out`` is the dense output added to the residual before ``attention.output.LayerNorm``,
``mlp_in`` is that LayerNorm's output, ``resid_post`` the layer output after ``output.LayerNorm``).
``resid_pre``/``resid_post``/``embed`` are the input/output of the layer modules for every family.
Any other model whose base model holds a list of ``num_hidden_layers`` layers gets the residual
sites only (family ``generic``); ``module:`` works for every model.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from torch import nn

__all__ = ["Site", "SITE_KINDS", "parse_site", "available_sites", "model_family", "resolve_module"]

LAYER_SITE_KINDS = ("resid_pre", "resid_post", "attn_z", "attn_out", "mlp_in", "mlp_out")
SITE_KINDS = ("embed",) + LAYER_SITE_KINDS + ("module",)

_FAMILY_OF = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
              "gemma2": "gemma2", "gemma3_text": "gemma2", "gpt2": "gpt2", "gpt_neox": "gpt_neox",
              "bert": "bert", "roberta": "bert", "xlm-roberta": "bert"}

# family -> (layer list path relative to the base model, {site kind: (path inside the layer, reads)})
_LAYOUT: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "llama": ("layers", {"attn_z": ("self_attn.o_proj", "input"), "attn_out": ("self_attn", "output"),
                         "mlp_in": ("mlp", "input"), "mlp_out": ("mlp", "output")}),
    "gemma2": ("layers", {"attn_z": ("self_attn.o_proj", "input"), "attn_out": ("post_attention_layernorm", "output"),
                          "mlp_in": ("mlp", "input"), "mlp_out": ("post_feedforward_layernorm", "output")}),
    "gpt2": ("h", {"attn_z": ("attn.c_proj", "input"), "attn_out": ("attn", "output"),
                   "mlp_in": ("mlp", "input"), "mlp_out": ("mlp", "output")}),
    "gpt_neox": ("layers", {"attn_z": ("attention.dense", "input"), "attn_out": ("attention", "output"),
                            "mlp_in": ("mlp", "input"), "mlp_out": ("mlp", "output")}),
    "bert": ("encoder.layer", {"attn_z": ("attention.output.dense", "input"),
                               "attn_out": ("attention.output.dense", "output"),
                               "mlp_in": ("intermediate", "input"), "mlp_out": ("output.dense", "output")}),
}
_GENERIC_LAYER_LISTS = ("layers", "h", "encoder.layer", "decoder.layers", "model.layers", "transformer.h")
_LAYER_RE = re.compile(r"layers\.(-?\d+)\.(\w+)")


@dataclass(frozen=True)
class Site:
    """A parsed site bound to one model: read ``reads`` ("input" or "output") of ``module``."""

    name: str
    layer: int | None
    kind: str
    """One of ``SITE_KINDS``."""
    module: str
    """Dotted path of the hooked module relative to the model ("" is the model itself)."""
    reads: str
    """"input": the module's first positional input (forward pre-hook); "output": its output."""
    d: int | None
    """Width of the activation (None when unknown before a forward, e.g. ``module:`` sites)."""


@dataclass(frozen=True)
class _Layout:
    family: str
    prefix: str  # path of the base model inside the model, "" or ending with "."
    layers: str  # full path of the layer ModuleList
    n_layers: int
    inner: dict[str, tuple[str, str]]


def _base_prefix(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name + "."
    return ""


def _layout(model: nn.Module) -> _Layout:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    prefix = _base_prefix(model)
    family = _FAMILY_OF.get(model_type)
    candidates = [_LAYOUT[family][0]] if family else list(_GENERIC_LAYER_LISTS)
    n_cfg = getattr(config, "num_hidden_layers", None)
    # Some releases name a head model's base_model_prefix after an attribute it lacks (transformers
    # 4.5x's Gemma3ForCausalLM says "language_model" but holds "model"): then try "model." too.
    prefixes = [prefix] + (["model."] if not prefix and isinstance(getattr(model, "model", None), nn.Module) else [])
    for base, rel in itertools.product(prefixes, candidates):
        try:
            layers = model.get_submodule(base + rel)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and (family or n_cfg is None or len(layers) == n_cfg):
            n = len(layers) if n_cfg is None else min(len(layers), n_cfg)
            return _Layout(family or "generic", base, base + rel, n, _LAYOUT[family][1] if family else {})
    if family:
        raise ValueError(f"{type(model).__name__} (model_type {model_type!r}) has no {prefix + candidates[0]!r} "
                         "layer list where its family keeps one; use module:<path> sites")
    return _Layout("unknown", prefix, "", 0, {})


def model_family(model: nn.Module) -> str:
    """"llama", "gemma2", "gpt2", "gpt_neox", "bert", "generic" (residual sites only) or "unknown"."""
    return _layout(model).family


def _kinds(lay: _Layout) -> tuple[str, ...]:
    return tuple(k for k in LAYER_SITE_KINDS if k in ("resid_pre", "resid_post") or k in lay.inner)


def _summary(lay: _Layout) -> str:
    parts = []
    if lay.n_layers:
        parts += ["embed", f"layers.{{0-{lay.n_layers - 1}}}.{{{','.join(_kinds(lay))}}}"]
    return ", ".join(parts + ["module:<path>", "module:<path>:input"])


def _describe(lay: _Layout) -> str:
    return f"model has {lay.n_layers} layers: 0-{lay.n_layers - 1}" if lay.n_layers else "model has no known layer list"


def available_sites(model: nn.Module) -> list[str]:
    """Every named site of ``model`` (``module:`` sites are open-ended and not listed)."""
    lay = _layout(model)
    if not lay.n_layers:
        return []
    return ["embed"] + [f"layers.{i}.{k}" for i in range(lay.n_layers) for k in _kinds(lay)]


def _width(module: nn.Module, reads: str) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features if reads == "input" else module.out_features
    weight = getattr(module, "weight", None)  # GPT-2's Conv1D keeps weight as (in, out)
    if type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2:
        return weight.shape[0] if reads == "input" else weight.shape[1]
    return None


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def parse_site(name: str, model: nn.Module) -> Site:
    """Bind ``name`` to ``model``; raise ``ValueError`` naming the valid sites when it does not exist."""
    if not isinstance(name, str):
        raise ValueError(f"site names are strings, got {name!r}")
    if name.startswith("module:"):
        path, reads = name[len("module:"):], "output"
        if path.endswith(":input"):
            path, reads = path[:-len(":input")], "input"
        elif path.endswith(":output"):
            path = path[:-len(":output")]
        if not path:
            raise ValueError(f"{name}: module: needs a dotted submodule path, e.g. module:{_example_path(model)}")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{name}: {type(model).__name__} has no submodule {path!r} "
                             f"(paths are those of model.named_modules(), e.g. {_example_path(model)!r})") from None
        return Site(name, None, "module", path, reads, _width(module, reads))

    lay = _layout(model)
    valid = f"valid sites: {_summary(lay)}"
    if name == "embed" and lay.n_layers:
        return Site(name, None, "embed", f"{lay.layers}.0", "input", _hidden_size(model))
    m = _LAYER_RE.fullmatch(name)
    if not m:
        raise ValueError(f"{name}: unknown site for {type(model).__name__} ({_describe(lay)}); {valid}")
    layer, kind = int(m.group(1)), m.group(2)
    if kind not in _kinds(lay):
        known = "" if kind in LAYER_SITE_KINDS else "unknown site kind "
        raise ValueError(f"{name}: {known}{kind!r} is not available for {type(model).__name__} "
                         f"(family {lay.family}); {valid}")
    if not 0 <= layer < lay.n_layers:
        raise ValueError(f"{name}: layer {layer} out of range ({_describe(lay)}); {valid}")
    layer_path = f"{lay.layers}.{layer}"
    if kind in ("resid_pre", "resid_post"):
        return Site(name, layer, kind, layer_path, "input" if kind == "resid_pre" else "output", _hidden_size(model))
    rel, reads = lay.inner[kind]
    path = f"{layer_path}.{rel}"
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{name}: expected module {path!r} is missing from {type(model).__name__} "
                         f"(family {lay.family}); use a module:<path> site instead") from None
    d = _width(module, reads) if kind == "attn_z" else _hidden_size(model)
    return Site(name, layer, kind, path, reads, d)


def resolve_module(model: nn.Module, site: Site) -> nn.Module:
    """The module a site hooks."""
    return model.get_submodule(site.module) if site.module else model


def _example_path(model: nn.Module) -> str:
    names = [n for n, _ in model.named_modules() if n]
    return names[min(len(names) - 1, 3)] if names else "<path>"
