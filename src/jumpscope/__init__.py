"""jumpscope: train, evaluate and use JumpReLU sparse autoencoders on transformer activations.

The short path::

    import jumpscope
    sae = jumpscope.load("path/to/sae")          # native, Gemma Scope params.npz or SAELens
    saes = jumpscope.train(sae_or_saes, batches, total_tokens=1_000_000)
"""

__version__ = "0.1.0"

from .formats import load, save  # noqa: E402
from .sae import SAE, SAEConfig, architectures, build  # noqa: E402
from .train import Trainer, TrainerConfig, train  # noqa: E402
from . import jacobian  # noqa: E402,F401  (registers the Jacobian SAE pair, "jsae")

__all__ = ["SAE", "SAEConfig", "Trainer", "TrainerConfig", "architectures", "build", "load", "save", "train",
           "__version__"]
