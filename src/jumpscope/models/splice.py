"""Run a model with sites' activations replaced by SAE reconstructions (or any other function).

``with splice(model, {"layers.3.resid_post": sae}): model(...)`` replaces the activation ``x`` at
each site by ``sae(x)``. With ``keep_error=True`` the SAE's error term ``x - sae(x)`` is added
back, so the model runs unchanged unless ``edit`` changes the latents: an intervention on latents
then changes the output only through those latents' decoder directions. Several SAEs at
different sites splice at once; hooks are always removed on exit.

``positions`` (a ``[batch, seq]`` bool mask) limits the replacement to those token positions, e.g.
the ``train_mask`` of the windows, so that BOS, separators and padding, which SAEs are not
trained on, keep their clean activations. :func:`replace_sites` is the general form behind
splicing and ablations: any ``Tensor -> Tensor`` function per site.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from ..sae.base import SAE
from .hookpoints import hook_replacement, unwrap
from .sites import parse_site, resolve_module

LatentEdit = Callable[[Tensor], Tensor]
Transform = Callable[[Tensor], Tensor]


def check_sae_fits(sae: SAE, site_name: str, model: Any) -> None:
    """Raise a clear error when an SAE's width does not match the site's (a transcoder: its input
    site's and the output site's)."""
    module_root = unwrap(model)
    for where, width, what in (((site_name, sae.cfg.d_in, "d_in"),) if not sae.cfg.target_site else
                               ((sae.cfg.site, sae.cfg.d_in, "d_in"), (site_name, sae.cfg.d_output, "d_out"))):
        site = parse_site(where, module_root)
        if site.d is not None and site.d != width:
            trained = sae.cfg.target_site or sae.cfg.site
            raise ValueError(f"SAE with {what}={width} does not fit site {where!r} of this model (width {site.d})"
                             f"{f'; the SAE was trained on {trained!r}' if trained not in (None, where) else ''}")


def reconstruct(sae: SAE, x: Tensor, keep_error: bool = False, edit: LatentEdit | None = None,
                target: Tensor | None = None) -> Tensor:
    """The SAE's replacement for ``target`` (default: ``x`` itself; a transcoder's output site),
    predicted from activations ``x`` (any leading shape), in the target's dtype and on its device
    (a model spread over several GPUs may hold a site on another device than the SAE)."""
    target = x if target is None else target
    if x.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"SAE with d_in={sae.cfg.d_in} cannot splice into activations of width {x.shape[-1]}"
                         f"{f' (it was trained on {sae.cfg.site!r})' if sae.cfg.site else ''}")
    flat = x.reshape(-1, x.shape[-1]).to(sae.W_enc.device, sae.W_enc.dtype)
    latents = sae.encode(flat)
    out = sae.predict(flat, edit(latents) if edit is not None else latents)
    if keep_error:
        clean = out if edit is None else sae.predict(flat, latents)
        # target + (edited - clean): exactly the target where the edit changes nothing
        out = target.reshape(-1, target.shape[-1]).to(out.device, out.dtype) + (out - clean)
    return out.reshape(*target.shape[:-1], out.shape[-1]).to(target.device, target.dtype)


def at_positions(transform: Transform, positions: Tensor | None, site_name: str) -> Transform:
    """``transform`` applied only at the ``positions`` ([batch, seq] bool) of a [batch, seq, d] tensor."""
    if positions is None:
        return transform

    def masked(x: Tensor) -> Tensor:
        if x.shape[:-1] != positions.shape:
            raise ValueError(f"site {site_name!r} carries a tensor of shape {tuple(x.shape)}, which does not match "
                             f"the positions mask of shape {tuple(positions.shape)}")
        mask = positions.to(x.device, torch.bool)
        out = x.clone()
        out[mask] = transform(x[mask])
        return out

    return masked


@contextlib.contextmanager
def replace_sites(model: Any, transforms: Mapping[str, Transform], *,
                  positions: Tensor | None = None) -> Iterator[None]:
    """Replace each site's activation ``x`` by ``transforms[site](x)`` while the block runs."""
    module_root = unwrap(model)
    handles = []
    try:
        for site_name, transform in transforms.items():
            site = parse_site(site_name, module_root)
            handles.append(hook_replacement(resolve_module(module_root, site), site.reads,
                                            at_positions(transform, positions, site_name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def splice(model: Any, saes: Mapping[str, SAE], *, keep_error: bool = False,
           edits: Mapping[str, LatentEdit] | None = None,
           positions: Tensor | None = None) -> contextlib.AbstractContextManager[None]:
    """Replace each site's activation by its SAE's reconstruction while the block runs. A
    transcoder (``cfg.target_site``) is keyed by the site it replaces and reads its ``cfg.site``,
    which must run earlier in the forward pass (e.g. mlp_in before mlp_out)."""
    transforms: dict[str, Transform] = {}
    inputs: dict[str, Tensor] = {}
    for site_name, sae in saes.items():
        check_sae_fits(sae, site_name, model)
        place_on_site_device(sae, model, site_name)
        edit = (edits or {}).get(site_name)
        source = sae.cfg.site if sae.cfg.target_site else None
        if source is not None and source not in transforms:
            if source in saes:
                raise ValueError(f"site {source!r} is both replaced and read by a transcoder; splice them separately")
            transforms[source] = _capture(inputs, source)

        def transform(y: Tensor, sae: SAE = sae, edit: LatentEdit | None = edit, source: str | None = source) -> Tensor:
            if source is None:
                return reconstruct(sae, y, keep_error, edit)
            if source not in inputs:
                raise RuntimeError(f"the transcoder's input site {source!r} had not run when its output site did")
            return reconstruct(sae, inputs[source], keep_error, edit, target=y)

        transforms[site_name] = transform
    return replace_sites(model, transforms, positions=positions)


def place_on_site_device(sae: SAE, model: Any, site_name: str) -> None:
    """Move ``sae`` to the device of its site's layer where a device map spread the model over
    several devices (``--device-map auto``), so the splice moves no activations between them."""
    module_root = unwrap(model)
    placed = set(getattr(module_root, "hf_device_map", {}).values())
    if len(placed) < 2:
        return
    module = resolve_module(module_root, parse_site(site_name, module_root))
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    if tensor is not None and tensor.device != sae.W_enc.device:
        sae.to(tensor.device)


def _capture(store: dict[str, Tensor], site_name: str) -> Transform:
    """An identity transform that remembers the value it saw (a transcoder's input)."""

    def capture(x: Tensor) -> Tensor:
        store[site_name] = x
        return x

    return capture
