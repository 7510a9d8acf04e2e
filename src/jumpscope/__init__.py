"""jumpscope: train, evaluate and use JumpReLU sparse autoencoders on transformer activations."""

__version__ = "0.1.0"

from .sae import SAE, SAEConfig, architectures, build  # noqa: E402

__all__ = ["SAE", "SAEConfig", "architectures", "build", "__version__"]
