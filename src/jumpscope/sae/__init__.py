"""SAE architectures: a shared base, one file per architecture, registered by name."""

from . import jumprelu  # noqa: F401  (registers the architecture)
from . import batchtopk, gated, relu, topk  # noqa: F401  (register the baselines)
from .base import SAE, LossOutput, SAEConfig, StepContext
from .registry import architectures, build, config_class, get_class, make_config

__all__ = ["SAE", "SAEConfig", "StepContext", "LossOutput", "architectures", "build", "config_class",
           "get_class", "make_config"]
