"""Steering and ablation: interventions on SAE latents while a model runs or generates.

    from jumpscope.steer import Ablate, Clamp, Steer, generate_with, intervene

    with intervene(model, {"layers.2.resid_post": (sae, [Steer(12, 8.0), Ablate([3, 4])])}):
        model.generate(...)
    text = generate_with(model, tokenizer, "Once upon a time", {site: (sae, [Steer(12, 8.0)])})

See :mod:`.interventions` for what each intervention does, :mod:`.intervene` for positions and
:mod:`.measure` for measuring steering (concept rate, fluency cost, random-direction control).
"""

from .generate import generate_ids, generate_with
from .intervene import Positions, SiteInterventions, intervene
from .interventions import (Ablate, Clamp, Intervention, Steer, SteerDirection, check_interventions, describe,
                            random_control, site_transform)
from .measure import Condition, ConceptRate, compare_generations, concept_rate, continuation_loss
from .report import display_text, measures_table, side_by_side

__all__ = ["Ablate", "Clamp", "Condition", "ConceptRate", "Intervention", "Positions", "SiteInterventions", "Steer",
           "SteerDirection", "check_interventions", "compare_generations", "concept_rate", "continuation_loss",
           "describe", "display_text", "generate_ids", "generate_with", "intervene", "measures_table",
           "random_control", "side_by_side", "site_transform"]
