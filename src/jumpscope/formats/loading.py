"""SAEs loaded for a job: several files or folders, named, placed at a site, and the model they fit."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

from ..sae import SAE

__all__ = ["load_saes", "model_of"]


def load_saes(paths: Sequence[str], site: str | None = None, allow_network: bool = False) -> dict[str, SAE]:
    """SAEs from folders, files or hf:// references, keyed by a readable name (the folder's name,
    made unique); ``site`` places SAEs whose file records none (or moves them)."""
    from . import load  # lazy: this module is imported by the formats package itself

    if not paths:
        raise ValueError("give at least one SAE folder or file")
    saes: dict[str, SAE] = {}
    for path in paths:
        sae = load(path, allow_network=allow_network)
        if site and sae.cfg.target_site:
            raise ValueError(f"{path}: --site cannot move a transcoder (it reads {sae.cfg.site!r} and writes "
                             f"{sae.cfg.target_site!r})")
        if site:
            sae.cfg = dataclasses.replace(sae.cfg, site=site)
        if not sae.cfg.site:
            raise ValueError(f"{path}: the SAE records no hook site; give one with --site")
        name = Path(path).name if Path(path).is_dir() else Path(path).stem
        while name in saes:
            name = f"{name}'"
        saes[name] = sae.eval()
    return saes


def model_of(model: str | None, saes: Mapping[str, SAE]) -> str:
    """``model`` when given, else the one model the SAEs record they were trained on."""
    if model:
        return model
    recorded = {sae.cfg.model for sae in saes.values() if sae.cfg.model}
    if len(recorded) != 1:
        raise ValueError("the SAEs do not name one model they were trained on "
                         f"({', '.join(sorted(recorded)) or 'none recorded'}); give --model")
    return recorded.pop()
