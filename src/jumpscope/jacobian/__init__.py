"""Jacobian SAEs' core (SPEC section 5): the MLP of a layer as tensors and the Jacobian between
an input SAE's and an output SAE's active latents across it.

- :func:`mlp_function` (``mlp.py``): ``layers.{L}.mlp_in`` -> ``layers.{L}.mlp_out`` of a model as an
  :class:`MLPFunction` ("plain" or "gated", Gemma 2's post-norm included), exact or refused;
  :func:`mlp_module`: the model's own modules as a callable, for the autograd fallback.
- :func:`jacobian_active` (``jacobian.py``): ``J [N, k_out, k_in]`` from weight products (reusable
  via :func:`precompute`), differentiable; :func:`jacobian_autograd`: the same by batched autograd
  for any MLP callable; :func:`jacobian_sparsity`; :func:`latent_response` and
  :func:`classify_response` for the scalar functions from one input latent to one output latent.
- :class:`JacobianSAE` (``pair.py``): the pair, trained by the ordinary trainer on (mlp_in, mlp_out).
"""

from .jacobian import (JacobianWeights, classify_response, jacobian_active, jacobian_autograd, jacobian_sparsity,
                       latent_response, precompute)
from .mlp import ACTIVATIONS, MLPFunction, activation_and_derivative, mlp_function, mlp_module
from .pair import JacobianSAE, JacobianSAEConfig

__all__ = ["MLPFunction", "mlp_function", "mlp_module", "ACTIVATIONS", "activation_and_derivative",
           "JacobianWeights", "precompute", "jacobian_active", "jacobian_autograd", "jacobian_sparsity",
           "latent_response", "classify_response", "JacobianSAE", "JacobianSAEConfig"]
