"""SAEs on the Hugging Face hub: Gemma Scope ``params.npz`` files, and SAE folders of any format.

A hub SAE is named by a repository id plus a path inside it, given either way:

- ``jumpscope.load("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")``;
- ``jumpscope.load("hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")``, the
  one-string form for the command line (``hf://owner/name@revision/path`` pins a revision).

The path names a ``params.npz`` (or the folder holding one), or a folder with ``cfg.json`` and
``sae.safetensors`` (native, sparsify) or ``sae_weights.safetensors`` (SAELens). Files are read
from the local Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, read at each call)
and downloaded with ``huggingface_hub.hf_hub_download`` only when ``allow_network=True``.

Gemma Scope repositories (``gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att,transcoders}``) also
say what the SAE reads: the model (``google/gemma-2-2b``, ``-it`` for the instruction-tuned
suites), the layer (``layer_20``) and site (res -> ``resid_post``, mlp -> ``mlp_out``,
att -> ``attn_z``, transcoders read ``mlp_in`` and predict ``mlp_out``), the width label
(``16k``) and the measured mean L0 (``average_l0_71``). They go into the SAE's config (model,
site, a transcoder's target_site and d_out) and into ``sae.source``, a dict recording where it
came from.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

PREFIX = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GEMMA_SCOPE = re.compile(r"^gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)\b")
_GEMMA_SCOPE_SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z", "transcoders": "mlp_in"}
# The files an SAE at a path may consist of (fetch tries them in turn).
_NPZ, _CFG, _WEIGHTS = "params.npz", "cfg.json", ("sae.safetensors", "sae_weights.safetensors")


@dataclass(frozen=True)
class HubRef:
    """An SAE on the hub: ``path`` (posix, "" for the root) inside ``repo_id`` at ``revision``."""

    repo_id: str
    path: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{PREFIX}{self.repo_id}{at}" + (f"/{self.path}" if self.path else "")


def is_hub_reference(path: Any) -> bool:
    """Whether ``path`` is an ``hf://`` string (``hf:/`` too, as ``Path`` collapses the slashes,
    unless such a local path exists)."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    return text.startswith(PREFIX) or (text.startswith("hf:/") and not Path(text).exists())


def parse_hub_reference(text: str | os.PathLike) -> HubRef:
    """``hf://owner/name[@revision][/path]`` as a :class:`HubRef`."""
    text = os.fspath(text)
    rest = text[len(PREFIX):] if text.startswith(PREFIX) else text[len("hf:/"):]
    parts = rest.split("/", 2)
    if len(parts) < 2:
        raise ValueError(f"{text!r}: expected hf://owner/name/path/inside/the/repository")
    name, _, revision = parts[1].partition("@")
    return HubRef(check_repo_id(f"{parts[0]}/{name}"), clean_path(parts[2] if len(parts) > 2 else ""),
                  revision or None)


def reference(path: Any, sae_id: str | None = None, revision: str | None = None) -> HubRef | None:
    """The hub SAE that ``load(path, sae_id, revision=...)`` names, or None for a local path
    (``path`` itself, or the folder ``path/sae_id`` when ``path`` is a local folder)."""
    if sae_id is not None:
        if is_hub_reference(path):
            raise ValueError(f"give either {os.fspath(path)!r} including the path inside the repository, or a "
                             f"repository id and {sae_id!r}, not both")
        if Path(path).exists():
            return None
        return HubRef(check_repo_id(os.fspath(path)), clean_path(sae_id), revision)
    if not is_hub_reference(path):
        return None
    ref = parse_hub_reference(path)
    if revision is not None and ref.revision is not None and revision != ref.revision:
        raise ValueError(f"{path!r} pins revision {ref.revision!r} but revision={revision!r} was given")
    return dataclasses.replace(ref, revision=ref.revision or revision)


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id!r} is neither a local file or folder nor a Hugging Face repository id "
                         "(owner/name)")
    return repo_id


def clean_path(path: str) -> str:
    """A path inside a repository, without leading/trailing slashes; '..' is refused."""
    parts = [part for part in PurePosixPath(path.strip("/")).parts if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{path!r}: '..' is not allowed in a path inside a repository")
    return "/".join(parts)


def fetch(ref: HubRef, *, allow_network: bool = False, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local copy of the SAE ``ref`` names: a ``params.npz`` file, or the cache folder holding
    its ``cfg.json`` and weights. Read from the cache unless ``allow_network``; a file missing
    from the cache (or the repository) is a FileNotFoundError saying how to get it."""
    if ref.path.endswith(".npz"):
        return _require(ref, ref.path, allow_network, cache_dir)
    order = (_NPZ,) if is_gemma_scope(ref.repo_id) else (_CFG, _NPZ)  # Gemma Scope holds params.npz only
    for name in order:
        found = _get(ref, _join(ref.path, name), allow_network, cache_dir)
        if found is None:
            continue
        if name == _NPZ:
            return found
        for weights in _WEIGHTS:  # native and sparsify: sae.safetensors; SAELens: sae_weights.safetensors
            if _get(ref, _join(ref.path, weights), allow_network, cache_dir) is not None:
                return found.parent
        raise FileNotFoundError(_missing(ref, [_join(ref.path, w) for w in _WEIGHTS], allow_network, cache_dir))
    raise FileNotFoundError(_missing(ref, [_join(ref.path, name) for name in order], allow_network, cache_dir))


def is_gemma_scope(repo_id: str) -> bool:
    return bool(_GEMMA_SCOPE.match(repo_id.split("/")[-1]))


def describe(ref: HubRef, local: Path) -> dict[str, Any]:
    """What is known of a fetched hub SAE: ``repo_id``, ``path``, ``revision``, ``commit`` (of the
    cached snapshot) and, for Gemma Scope, ``model``, ``site``, ``layer``, ``width``,
    ``average_l0``, ``transcoder`` and a transcoder's ``target_site`` (each only where the
    names tell it)."""
    parts = Path(local).parts  # <cache>/models--owner--name/snapshots/<commit>/<path>
    commit = next((parts[i + 1] for i in range(1, len(parts) - 1)
                   if parts[i] == "snapshots" and parts[i - 1].startswith("models--")), None)
    info: dict[str, Any] = {"repo_id": ref.repo_id, "path": ref.path, "revision": ref.revision or "main",
                            "commit": commit}
    match = _GEMMA_SCOPE.match(ref.repo_id.split("/")[-1])
    if not match:
        return info
    size, variant, kind = match.groups()
    info["model"] = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
    info["transcoder"] = kind == "transcoders"
    folders = PurePosixPath(ref.path).parts
    for folder in folders:
        if m := re.fullmatch(r"layer_(\d+)", folder):
            info["layer"] = int(m.group(1))
            info["site"] = f"layers.{info['layer']}.{_GEMMA_SCOPE_SITES[kind]}"
            if kind == "transcoders":
                info["target_site"] = f"layers.{info['layer']}.mlp_out"
        elif m := re.fullmatch(r"width_(\w+)", folder):
            info["width"] = m.group(1)  # the label ("16k" = 16384 latents); the config's d_sae is exact
        elif m := re.fullmatch(r"average_l0_(\d+)", folder):
            info["average_l0"] = int(m.group(1))
    return info


def annotate(sae: Any, info: dict[str, Any]) -> Any:
    """Record ``info`` on ``sae`` as ``sae.source``; mark a Gemma Scope transcoder as one
    (``d_out = d_in``: it predicts the MLP output, not its input)."""
    if info.get("transcoder") and sae.cfg.d_out is None:
        sae.cfg = dataclasses.replace(sae.cfg, d_out=sae.cfg.d_in)
    sae.source = dict(info)
    return sae


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _require(ref: HubRef, filename: str, allow_network: bool, cache_dir: Any) -> Path:
    found = _get(ref, filename, allow_network, cache_dir)
    if found is None:
        raise FileNotFoundError(_missing(ref, [filename], allow_network, cache_dir))
    return found


def _get(ref: HubRef, filename: str, allow_network: bool, cache_dir: Any) -> Path | None:
    """The local path of ``filename``, downloaded if allowed; None when it is not there (not in
    the cache, offline; not in the repository, online). Other failures raise with the cause."""
    hub = _huggingface_hub()
    from huggingface_hub import errors

    remote_missing = tuple({errors.EntryNotFoundError, getattr(errors, "RemoteEntryNotFoundError",
                                                               errors.EntryNotFoundError)})
    try:
        return Path(hub.hf_hub_download(ref.repo_id, filename, revision=ref.revision, cache_dir=_cache_dir(cache_dir),
                                        local_files_only=not allow_network))
    except errors.LocalEntryNotFoundError as error:
        if not allow_network:
            return None
        raise OSError(f"{ref}: cannot download {filename} from the Hugging Face hub and it is not cached "
                      f"({_first_line(error)})") from None
    except remote_missing:
        return None
    except errors.RepositoryNotFoundError as error:  # also gated or private repositories
        raise FileNotFoundError(f"{ref}: repository {ref.repo_id!r} not found on the Hugging Face hub, or it "
                                f"is private or gated (log in with `hf auth login`): {_first_line(error)}") from None
    except errors.RevisionNotFoundError as error:
        raise FileNotFoundError(f"{ref}: revision {ref.revision!r} not found: {_first_line(error)}") from None
    except (errors.HfHubHTTPError, getattr(errors, "HFValidationError", ValueError)) as error:
        raise OSError(f"{ref}: cannot fetch {filename} from the Hugging Face hub: {_first_line(error)}") from None


def _missing(ref: HubRef, files: list[str], allow_network: bool, cache_dir: Any) -> str:
    listed = " or ".join(files)
    if allow_network:
        return f"{ref}: repository {ref.repo_id} has no {listed}"
    where = _cache_dir(cache_dir) or _huggingface_hub().constants.HF_HUB_CACHE
    what = files[0] if len(files) == 1 else f'--include "{_join(ref.path, "*")}"'
    revision = f" --revision {ref.revision}" if ref.revision else ""
    return (f"{ref}: {listed} is not in the local Hugging Face cache ({where}); allow the download with "
            f"allow_network=True (command line: --allow-network), or download it first with "
            f"`hf download {ref.repo_id} {what}{revision}`")


def _cache_dir(explicit: str | os.PathLike | None) -> str | None:
    """The hub cache folder, read from the environment now rather than when huggingface_hub was
    imported (a script may set HF_HOME after importing transformers); None: the library default."""
    if explicit is not None:
        return os.fspath(explicit)
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _huggingface_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:  # installed with transformers; imported lazily as local loading never needs it
        raise ImportError("loading SAEs from the Hugging Face hub needs the huggingface_hub package "
                          "(`pip install huggingface_hub`)") from None
    return huggingface_hub


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
