"""Run a model with sites' activations replaced by SAE reconstructions.

``with splice(model, {"layers.3.resid_post": sae}): model(...)`` replaces the activation ``x`` at
each site by ``sae(x)``. With ``keep_error=True`` the SAE's error term ``x - sae(x)`` is added
back, so the model runs unchanged unless ``edit`` changes the latents: an intervention on latents
then changes the output only through those latents' decoder directions. Several SAEs at
different sites splice at once; hooks are always removed on exit.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

from torch import Tensor

from ..sae.base import SAE
from .hookpoints import hook_replacement, unwrap
from .sites import parse_site, resolve_module

LatentEdit = Callable[[Tensor], Tensor]


def check_sae_fits(sae: SAE, site_name: str, model: Any) -> None:
    """Raise a clear error when an SAE's width does not match the site's."""
    site = parse_site(site_name, unwrap(model))
    if site.d is not None and site.d != sae.cfg.d_in:
        raise ValueError(f"SAE with d_in={sae.cfg.d_in} does not fit site {site_name!r} of this model "
                         f"(width {site.d}){f'; the SAE was trained on {sae.cfg.site!r}' if sae.cfg.site else ''}")


def reconstruct(sae: SAE, x: Tensor, keep_error: bool = False, edit: LatentEdit | None = None) -> Tensor:
    """The SAE's replacement for activations ``x`` (any leading shape), in ``x``'s dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(sae.W_enc.dtype)
    latents = sae.encode(flat)
    out = sae.decode(edit(latents) if edit is not None else latents)
    if keep_error:
        out = out + (flat - sae.decode(latents))
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


@contextlib.contextmanager
def splice(model: Any, saes: Mapping[str, SAE], *, keep_error: bool = False,
           edits: Mapping[str, LatentEdit] | None = None) -> Iterator[None]:
    """Replace each site's activation by its SAE's reconstruction while the block runs."""
    module_root = unwrap(model)
    handles = []
    try:
        for site_name, sae in saes.items():
            check_sae_fits(sae, site_name, module_root)
            site = parse_site(site_name, module_root)
            edit = (edits or {}).get(site_name)

            def transform(x: Tensor, sae: SAE = sae, edit: LatentEdit | None = edit) -> Tensor:
                return reconstruct(sae, x, keep_error, edit)

            handles.append(hook_replacement(resolve_module(module_root, site), site.reads, transform))
        yield
    finally:
        for handle in handles:
            handle.remove()
