"""The evaluation stage: how good an SAE is, measured on held-out text with the model in the loop.

- :mod:`.heldout`: :func:`evaluate_saes` (core metrics and spliced measures per SAE, shared by
  train, sweep, suite, jsae and eval so their numbers are comparable), the held-out windows it
  uses, and the Markdown results table.
- :mod:`.downstream`: the model's own measures with SAEs spliced in (delta LM loss, KL, CE loss
  recovered; the embedding distance for encoders).
- :mod:`.plots` and :mod:`.report`: a sweep's frontier plots and Markdown report.
"""

from .downstream import ABLATIONS, MAIN_MEASURE, spliced_measures
from .heldout import TOGETHER, evaluate_saes, evaluation_windows, replaced_site, results_table

__all__ = ["ABLATIONS", "MAIN_MEASURE", "TOGETHER", "evaluate_saes", "evaluation_windows", "replaced_site",
           "results_table", "spliced_measures"]
