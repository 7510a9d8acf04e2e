"""Steering and ablation: interventions on SAE latents while a model runs or generates.

    from jumpscope.steer import Ablate, Clamp, Steer, generate_with, intervene

    with intervene(model, {"layers.2.resid_post": (sae, [Steer(12, 8.0), Ablate([3, 4])])}):
        model.generate(...)
    text = generate_with(model, tokenizer, "Once upon a time", {site: (sae, [Steer(12, 8.0)])})

See :mod:`.interventions` for what each intervention does and :mod:`.intervene` for positions.
"""

from .generate import generate_ids, generate_with
from .intervene import Positions, SiteInterventions, intervene
from .interventions import Ablate, Clamp, Intervention, Steer, check_interventions, describe, site_transform
from .report import display_text, side_by_side

__all__ = ["Ablate", "Clamp", "Intervention", "Positions", "SiteInterventions", "Steer", "check_interventions",
           "describe", "display_text", "generate_ids", "generate_with", "intervene", "side_by_side",
           "site_transform"]
