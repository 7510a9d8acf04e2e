"""The MLP of one layer as plain tensors: exactly our ``layers.{L}.mlp_in`` -> ``layers.{L}.mlp_out``.

``mlp_function(model, layer)`` reads the weights of the modules that our hook sites
(:mod:`jumpscope.models.sites`) read, so ``mlp(harvested mlp_in) == harvested mlp_out``:

- ``plain``  ``y = act(x @ W_in + b_in) @ W_out + b_out``: GPT-2 (``mlp.c_fc`` / ``mlp.c_proj``,
  Conv1D weights already stored ``(in, out)``), GPT-NeoX/Pythia (``mlp.dense_h_to_4h`` /
  ``dense_4h_to_h``) and BERT/RoBERTa/MiniLM (``intermediate.dense`` / ``output.dense``: our
  ``mlp_out`` is that dense's output, before BERT's dropout, residual add and LayerNorm);
- ``gated``  ``y = (act(x @ W_gate + b_gate) * (x @ W_up + b_up)) @ W_down + b_down``: Llama,
  Mistral, Qwen2/3 and Gemma (SwiGLU/GeGLU; the fields are ``W_in`` = W_gate, ``W_out`` = W_down,
  with ``W_gate`` / ``W_down`` as aliases);
- Gemma 2 / Gemma 3 (family ``gemma2``): the gated MLP followed by the post-feedforward RMSNorm,
  which our ``mlp_out`` includes: ``y = norm_weight * z / sqrt(mean(z^2) + norm_eps)`` with ``z``
  the MLP output and ``norm_weight = 1 + weight`` (Gemma's RMSNorm convention).

Activations (read from the config key the family's module reads: ``hidden_act``,
``hidden_activation``, ``activation_function``): ``relu``, ``gelu`` (erf), ``gelu_tanh``
(``gelu_new``, ``gelu_pytorch_tanh``) and ``silu`` (``swish``), each with its exact derivative.
Anything else (another activation, a callable ``hidden_act``, another norm, a layer whose MLP is not
the expected module) is refused with a ``ValueError``; ``mlp_module(model, layer)`` then gives the
model's own modules as a callable for :func:`jumpscope.jacobian.jacobian_autograd`. As a last
guard, the formula is checked against the model's modules on random inputs when it is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..models.hookpoints import first_output, unwrap
from ..models.sites import model_family, parse_site, resolve_module

__all__ = ["MLPFunction", "mlp_function", "mlp_module", "ACTIVATIONS", "activation_and_derivative"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _relu(u: Tensor) -> tuple[Tensor, Tensor]:
    return torch.relu(u), (u > 0).to(u.dtype)


def _gelu(u: Tensor) -> tuple[Tensor, Tensor]:
    cdf = 0.5 * (1.0 + torch.erf(u * _INV_SQRT_2))
    return u * cdf, cdf + u * torch.exp(-0.5 * u * u) * _INV_SQRT_2PI


def _gelu_tanh(u: Tensor) -> tuple[Tensor, Tensor]:
    t = torch.tanh(_SQRT_2_OVER_PI * (u + 0.044715 * u ** 3))
    grad = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * u * u)
    return 0.5 * u * (1.0 + t), grad


def _silu(u: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(u)
    return u * s, s * (1.0 + u * (1.0 - s))


# canonical name -> u -> (act(u), act'(u)); both differentiable (a loss may backpropagate through u)
ACTIVATIONS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "relu": _relu, "gelu": _gelu, "gelu_tanh": _gelu_tanh, "silu": _silu}
# transformers' ACT2FN names that are exactly one of those functions
_ALIASES = {"relu": "relu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
            "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}
_FALLBACK = "use jacobian_autograd(mlp_module(model, layer), ...) from jumpscope.jacobian instead"


def activation_and_derivative(name: str) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``u -> (act(u), act'(u))`` for a canonical name or a transformers alias (``gelu_new``...)."""
    canonical = _ALIASES.get(name, name) if isinstance(name, str) else None
    if canonical not in ACTIVATIONS:
        raise ValueError(f"unsupported MLP activation {name!r} (supported: {', '.join(sorted(_ALIASES))}); "
                         f"{_FALLBACK}")
    return ACTIVATIONS[canonical]


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==
class MLPFunction:
    """One MLP as tensors, callable on ``[..., d_model]``; weights are ``(in, out)`` (x @ W).

    ``kind`` "plain": ``act(x @ W_in + b_in) @ W_out + b_out``; "gated":
    ``(act(x @ W_in + b_in) * (x @ W_up + b_up)) @ W_out + b_out`` (W_in is W_gate, W_out is W_down).
    ``norm_weight`` (optional): the output then goes through ``norm_weight * z / rms(z)`` with
    ``rms(z) = sqrt(mean(z^2) + norm_eps)`` (Gemma 2's post-feedforward RMSNorm). The tensors are
    detached from the model (views of its parameters): the Jacobian trains SAEs, not the model.
    """

    kind: str
    activation: str
    """A canonical name of ``ACTIVATIONS``."""
    W_in: Tensor
    """[d_model, d_mlp]: the input projection (plain) or the gate projection (gated)."""
    W_out: Tensor
    """[d_mlp, d_model]: the output (down) projection."""
    b_in: Tensor | None = None
    b_out: Tensor | None = None
    W_up: Tensor | None = None
    """[d_model, d_mlp], gated only: the linear branch multiplied by act(gate)."""
    b_up: Tensor | None = None
    norm_weight: Tensor | None = None
    """[d_model]: the effective scale of a post-MLP RMSNorm (already 1 + weight for Gemma), or None."""
    norm_eps: float = 1e-6
    family: str = ""
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("plain", "gated"):
            raise ValueError(f"MLPFunction kind must be 'plain' or 'gated', got {self.kind!r}")
        activation_and_derivative(self.activation)
        d_model, d_mlp = self.W_in.shape
        expect = {"W_out": (d_mlp, d_model), "b_in": (d_mlp,), "b_out": (d_model,), "W_up": (d_model, d_mlp),
                  "b_up": (d_mlp,), "norm_weight": (d_model,)}
        for name, shape in expect.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"MLPFunction.{name} has shape {tuple(value.shape)}, expected {shape}")
        if (self.kind == "gated") != (self.W_up is not None):
            raise ValueError("a gated MLP needs W_up and a plain one must not have it")

    @property
    def d_model(self) -> int:
        return self.W_in.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.W_in.shape[1]

    @property
    def W_gate(self) -> Tensor:
        return self.W_in

    @property
    def W_down(self) -> Tensor:
        return self.W_out

    def to(self, *args: Any, **kwargs: Any) -> "MLPFunction":
        """A copy with every tensor moved/cast like ``Tensor.to`` (e.g. ``.to(torch.float64)``)."""
        moved = {f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **moved)

    def linearise(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """``(h, terms)``: the hidden activation h [..., d_mlp] and its derivative as
        ``dh[m]/dx[b] = sum over (W, a) in terms of W[b, m] * a[..., m]``.

        plain: ``[(W_in, act'(u))]``; gated: ``[(W_gate, act'(g) * up), (W_up, act(g))]``.
        """
        act = activation_and_derivative(self.activation)
        u = _affine(x, self.W_in, self.b_in)
        value, grad = act(u)
        if self.kind == "plain":
            return value, [(self.W_in, grad)]
        up = _affine(x, self.W_up, self.b_up)
        return value * up, [(self.W_in, grad * up), (self.W_up, value)]

    def project(self, h: Tensor) -> Tensor:
        """The MLP output before any post-norm: ``h @ W_out + b_out``."""
        return _affine(h, self.W_out, self.b_out)

    def rms(self, z: Tensor) -> Tensor:
        """``sqrt(mean(z^2) + norm_eps)`` over the last dim, kept as a size-1 dim."""
        return torch.sqrt(z.pow(2).mean(-1, keepdim=True) + self.norm_eps)

    def __call__(self, x: Tensor) -> Tensor:
        z = self.project(self.linearise(x)[0])
        return z if self.norm_weight is None else self.norm_weight * z / self.rms(z)


def _affine(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    return x @ W if b is None else x @ W + b


def _site_modules(model: nn.Module, layer: int) -> tuple[str, nn.Module, nn.Module]:
    """(family, module read by mlp_in, module read by mlp_out); parse_site does the layer checks."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an integer, got {layer!r}")
    site_in = parse_site(f"layers.{layer}.mlp_in", model)
    site_out = parse_site(f"layers.{layer}.mlp_out", model)
    return model_family(model), resolve_module(model, site_in), resolve_module(model, site_out)


def mlp_module(model: Any, layer: int) -> Callable[[Tensor], Tensor]:
    """The model's own modules from ``layers.{layer}.mlp_in`` to ``mlp_out`` as one callable (any
    activation or norm; in the model's train/eval mode): the input to :func:`jacobian_autograd`
    where :func:`mlp_function` refuses. For every supported family ``mlp_out`` is the output of the
    mlp_in module, or of the module right after it (BERT's ``output.dense``, Gemma 2's post-norm)."""
    model = unwrap(model)
    _, m_in, m_out = _site_modules(model, layer)
    if m_in is m_out:
        return lambda x: first_output(m_in(x))
    return lambda x: first_output(m_out(first_output(m_in(x))))


def _activation_name(config: Any, family: str) -> Any:
    model_type = str(getattr(config, "model_type", ""))
    if family == "gpt2":
        keys = ("activation_function",)
    elif model_type.startswith("gemma"):  # Gemma 2/3 read hidden_activation; Gemma 1 reads hidden_act
        keys = ("hidden_activation", "hidden_act")
    else:
        keys = ("hidden_act",)
    return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)


def _linear(module: nn.Module, name: str, what: str) -> tuple[Tensor, Tensor | None]:
    """(W as (in, out), bias) of a child Linear / GPT-2 Conv1D, detached."""
    child = getattr(module, name, None)
    if isinstance(child, nn.Linear):
        return child.weight.detach().T, None if child.bias is None else child.bias.detach()
    if type(child).__name__ == "Conv1D" and getattr(child, "weight", None) is not None:
        return child.weight.detach(), child.bias.detach()  # Conv1D computes x @ weight + bias
    raise ValueError(f"{what}: expected a Linear {name!r} in {type(module).__name__}, found "
                     f"{type(child).__name__ if child is not None else 'nothing'}: not a supported MLP; {_FALLBACK}")


def mlp_function(model: Any, layer: int) -> MLPFunction:
    """The MLP of ``layer`` as an :class:`MLPFunction` mapping our ``layers.{layer}.mlp_in`` to our
    ``layers.{layer}.mlp_out`` exactly (see the module docstring for each family).

    Raises ``ValueError`` for a layer out of range or a model without MLP sites (from
    ``parse_site``), an unsupported family, activation or norm, or a layer whose MLP is not the
    expected module; the message suggests the autograd fallback (``mlp_module``)."""
    model = unwrap(model)
    family, m_in, m_out = _site_modules(model, layer)
    what = f"layers.{layer} of {type(model).__name__} (family {family})"
    act = _activation_name(getattr(model, "config", None), family)
    try:
        activation_and_derivative(act)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None
    canonical = _ALIASES[act]
    if family in ("llama", "gemma2"):
        W_g, b_g = _linear(m_in, "gate_proj", what)
        W_u, b_u = _linear(m_in, "up_proj", what)
        W_d, b_d = _linear(m_in, "down_proj", what)
        norm_weight, eps = None, 1e-6
        if family == "gemma2":
            if type(m_out).__name__ not in ("Gemma2RMSNorm", "Gemma3RMSNorm"):
                raise ValueError(f"{what}: the post-feedforward norm is a {type(m_out).__name__}, not Gemma's "
                                 f"RMSNorm; {_FALLBACK}")
            norm_weight, eps = 1.0 + m_out.weight.detach(), float(m_out.eps)
        fn = MLPFunction("gated", canonical, W_g, W_d, b_g, b_d, W_u, b_u, norm_weight, eps, family, layer)
    elif family in ("gpt2", "gpt_neox"):
        names = ("c_fc", "c_proj") if family == "gpt2" else ("dense_h_to_4h", "dense_4h_to_h")
        (W_i, b_i), (W_o, b_o) = _linear(m_in, names[0], what), _linear(m_in, names[1], what)
        fn = MLPFunction("plain", canonical, W_i, W_o, b_i, b_o, family=family, layer=layer)
    elif family == "bert":
        W_i, b_i = _linear(m_in, "dense", what)
        if not isinstance(m_out, nn.Linear):
            raise ValueError(f"{what}: output.dense is a {type(m_out).__name__}, not a Linear; {_FALLBACK}")
        fn = MLPFunction("plain", canonical, W_i, m_out.weight.detach().T, b_i,
                         None if m_out.bias is None else m_out.bias.detach(), family=family, layer=layer)
    else:
        raise ValueError(f"{what}: no MLP formula for this family; {_FALLBACK}")
    _check_against_modules(fn, mlp_module(model, layer), m_in, m_out, what)
    return fn


def _check_against_modules(fn: MLPFunction, reference: Callable[[Tensor], Tensor], m_in: nn.Module,
                           m_out: nn.Module, what: str) -> None:
    """Refuse a formula that does not reproduce the modules on random inputs (e.g. a patched
    activation module): a wrong Jacobian would otherwise go unnoticed. Dropout is switched off
    for the check (eval mode), then every module's mode is restored."""
    modes = [(m, m.training) for root in (m_in, m_out) for m in root.modules()]
    dtype, device = fn.W_in.dtype, fn.W_in.device
    x = torch.randn(8, fn.d_model, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad():
            want, got = reference(x).float(), fn.to(torch.float32)(x.float())
    finally:
        for m, training in modes:
            m.train(training)
    tol = max(2e-5, 8 * torch.finfo(dtype).eps)
    error = (got - want).norm() / want.norm().clamp_min(1e-12)
    if not torch.isfinite(error) or error > tol:
        raise ValueError(f"{what}: the {fn.kind} {fn.activation} formula does not reproduce the model's MLP "
                         f"(relative error {float(error):.2e}); {_FALLBACK}")
