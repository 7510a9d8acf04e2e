"""Optimisers and the learning-rate / sparsity-coefficient schedules.

Two optimisers, chosen per SAE by ``cfg.optimizer``:

- ``adam``: ``torch.optim.Adam`` with the config's betas and eps.
- ``signsgd_schedulefree``: sign descent wrapped in schedule-free averaging (Defazio et al. 2024,
  "The Road Less Scheduled"), the default recipe of EleutherAI's sparsify. The parameters hold the
  gradient point y = beta x + (1 - beta) z during training; z takes the sign steps and x is the
  average of the z iterates (weights lr_max^2, so uniform at a constant rate). Before an SAE is
  saved or evaluated, :func:`use_average` puts x in the parameters (:func:`use_training_point`
  goes back). It needs no schedule: no warm-up, no decay.

Schedules: a warm-up is given in steps (>= 1) or, below 1, as a fraction of the run, so a recipe
fits any budget; :func:`schedule_warnings` says when one does not fit the run it is given.
"""

from __future__ import annotations

import math

import torch

from ..sae.base import SAE

OPTIMIZERS = ("adam", "signsgd_schedulefree")
SIGNUM_MOMENTUM = 0.9  # unaveraged parameters' step "signum": m <- 0.9 m + 0.1 g, p <- p - lr sign(m)


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    """Sign descent with schedule-free averaging; the update of ``schedulefree.ScheduleFreeWrapper``
    around sparsify's ``SignSGD`` (momentum ``beta``, ``weight_lr_power`` 2, ``r`` 0), in one pass.

    Per step t with gradient g taken at the parameters p = y:
    x = y + (1 - 1/beta)(z - y); z <- z - lr sign(g); c = t^r lr_max^2 / sum of those so far;
    x <- (1 - c) x + c z; p <- beta x + (1 - beta) z.
    """

    def __init__(self, params, lr: float = 1e-3, beta: float = 0.95, average_power: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 < beta < 1:
            raise ValueError(f"beta must lie in (0, 1), got {beta}")
        super().__init__(params, {"lr": lr, "beta": beta, "weight_sum": 0.0, "lr_max": 0.0, "k": 0, "average": True,
                                  "r": float(average_power)})
        self.averaged = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.averaged:
            raise RuntimeError("step() while the parameters hold the average; call use_training_point() first")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, beta = group["lr"], group["beta"]
            if not group["average"]:  # the parameters are the latest iterate
                self._latest_step(group, params, lr)
                continue
            for p in params:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = p.detach().clone()
            zs = [self.state[p]["z"] for p in params]
            group["lr_max"] = max(lr, group["lr_max"])
            weight = (group["k"] + 1) ** group.get("r", 0.0) * group["lr_max"] ** 2
            group["weight_sum"] += weight
            group["k"] += 1
            c = weight / group["weight_sum"]
            # y -> x, z -= lr s, x <- (1 - c) x + c z, x -> y, in three passes: with s = sign(g),
            # y' = (1 - c) y + c z - (1 - beta (1 - c)) lr s (the z terms of y -> x and x -> y cancel)
            signs = [p.grad.sign() for p in params]
            torch._foreach_lerp_(params, zs, c)
            torch._foreach_add_(params, signs, alpha=-(1 - beta * (1 - c)) * lr)
            torch._foreach_add_(zs, signs, alpha=-lr)
        return None

    def _latest_step(self, group: dict, params: list, lr: float) -> None:
        """Unaveraged parameters: steps of ``lr_factor`` x lr normalised by a running RMS of the
        gradient (Adam with beta1 0, beta2 0.999, bias-corrected), which shrink where the gradient
        is intermittent, as a threshold's is when few inputs fall in its kernel; with ``step="sign"``,
        plain sign steps of that size; with ``step="signum"``, sign steps of a momentum of the
        gradient (0.9), which keep moving between the batches that reach a parameter."""
        lr = lr * group.get("lr_factor", 1.0)
        if group.get("step") == "sign":
            torch._foreach_add_(params, torch._foreach_sign([p.grad for p in params]), alpha=-lr)
            return
        if group.get("step") == "signum":
            momenta = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params]
            torch._foreach_lerp_(momenta, [p.grad for p in params], 1.0 - SIGNUM_MOMENTUM)
            torch._foreach_add_(params, torch._foreach_sign(momenta), alpha=-lr)
            return
        group["rms_steps"] = group.get("rms_steps", 0) + 1
        correction = 1 - 0.999 ** group["rms_steps"]
        for p in params:
            square = self.state[p].setdefault("square", torch.zeros_like(p))
            square.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
            p.addcdiv_(p.grad, (square / correction).sqrt_().add_(1e-8), value=-lr)

    @torch.no_grad()
    def use_average(self) -> None:
        """Put x (the average, what to save and evaluate) in the parameters."""
        if not self.averaged:
            self._lerp_all(lambda beta: 1 - 1 / beta)
            self.averaged = True

    @torch.no_grad()
    def use_training_point(self) -> None:
        """Put y (where gradients are taken) back in the parameters."""
        if self.averaged:
            self._lerp_all(lambda beta: 1 - beta)
            self.averaged = False

    def _lerp_all(self, weight) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if "z" in self.state[p]] if group["average"] else []
            if params:
                torch._foreach_lerp_(params, [self.state[p]["z"] for p in params], weight(group["beta"]))


# lr_reference_steps scales lr for runs within this factor of the reference length either way
RUN_LENGTH_RANGE = 4.0


def peak_lr(sae: SAE, total_steps: int | None = None) -> float:
    """The config's lr, times sqrt(lr_reference_width / d_sae) when a reference width is set
    (sparsify's width rule: wider dictionaries take smaller steps) and times
    sqrt(lr_reference_steps / total_steps) when a reference run length is set and the run's is
    known (clamped to RUN_LENGTH_RANGE either way: longer runs take smaller steps), and times
    sqrt(lr_reference_d_in / d_in) when a reference input width is set."""
    cfg = sae.cfg
    lr = cfg.lr
    if cfg.lr_reference_width is not None:
        lr *= math.sqrt(cfg.lr_reference_width / cfg.d_sae)
    if cfg.lr_reference_d_in is not None:
        lr *= math.sqrt(cfg.lr_reference_d_in / cfg.d_in)
    if cfg.lr_reference_steps is not None and total_steps:
        reference = cfg.lr_reference_steps
        steps = min(max(total_steps, reference / RUN_LENGTH_RANGE), reference * RUN_LENGTH_RANGE)
        lr *= math.sqrt(reference / steps)
    return lr


def make_optimizer(sae: SAE, batch_size: int | None = None, total_steps: int | None = None) -> torch.optim.Optimizer:
    """The optimiser the SAE's own config names, with its hyperparameters (``batch_size``: the
    rows of each step, over all processes, and ``total_steps``, where the recipe depends on them)."""
    cfg = sae.cfg
    if cfg.optimizer == "signsgd_schedulefree":
        steered = sae.unaveraged_parameters(batch_size, total_steps)
        latest = {id(p) for p in steered["params"]} if steered else set()
        groups = [{"params": [p for p in sae.parameters() if id(p) not in latest]}]
        if latest:
            groups.append({"params": [p for p in sae.parameters() if id(p) in latest], "average": False,
                           "lr_factor": steered.get("lr_factor", 1.0), "step": steered.get("step", "rms")})
        return ScheduleFreeSignSGD(groups, lr=peak_lr(sae), beta=cfg.schedule_free_beta,
                                   average_power=cfg.schedule_free_average_power)
    return torch.optim.Adam(sae.parameters(), lr=peak_lr(sae), betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps)


def use_average(optimizer: torch.optim.Optimizer) -> bool:
    """Before saving or evaluating: the averaged weights, for optimisers that keep them (True)."""
    if isinstance(optimizer, ScheduleFreeSignSGD):
        optimizer.use_average()
        return True
    return False


def use_training_point(optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer, ScheduleFreeSignSGD):
        optimizer.use_training_point()


def schedule_steps(value: float, total_steps: int) -> int:
    """A warm-up length in steps: ``value`` steps when >= 1, else that fraction of the run; a
    negative value means the whole run."""
    if value < 0:
        return total_steps
    return int(value) if value >= 1 else math.ceil(value * total_steps)


def lr_factor(step: int, total_steps: int, warmup: float, decay_fraction: float) -> float:
    """Linear warm-up from 0 over ``warmup`` (steps, or a fraction of the run below 1), then
    constant, then a linear decay to 0 over the last ``decay_fraction`` of the run."""
    warmup_steps = schedule_steps(warmup, total_steps)
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay_steps = int(total_steps * decay_fraction)
    if decay_steps > 0:
        factor *= min(1.0, (total_steps - step) / decay_steps)
    return max(factor, 0.0)


def sparsity_factor(step: int, total_steps: int, warmup: float) -> float:
    """Linear warm-up of the sparsity coefficient (steps, a fraction of the run below 1, or the
    whole run when negative)."""
    warmup_steps = schedule_steps(warmup, total_steps)
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def schedule_warnings(name: str, sae: SAE, total_steps: int) -> list[str]:
    """One line per schedule of this SAE that does not fit a run of ``total_steps`` steps."""
    cfg = sae.cfg
    warmup = schedule_steps(cfg.lr_warmup_steps, total_steps) if cfg.lr_warmup_steps >= 0 else 0
    decay = int(total_steps * cfg.lr_decay_fraction)
    lines = []
    if warmup > total_steps // 2:
        lines.append(f"SAE {name!r}: the learning-rate warm-up ({warmup} steps) takes {warmup / total_steps:.0%} of "
                     f"the {total_steps}-step run; give it as a fraction (e.g. --sae-lr-warmup-steps 0.05) or "
                     "train longer")
    elif warmup + decay > total_steps:
        lines.append(f"SAE {name!r}: warm-up ({warmup} steps) and decay ({decay} steps) overlap in the "
                     f"{total_steps}-step run, so the learning rate never reaches its peak")
    sparsity = cfg.sparsity_warmup_steps
    if sparsity >= 1 and sparsity > total_steps:
        lines.append(f"SAE {name!r}: the sparsity warm-up ({int(sparsity)} steps) is longer than the "
                     f"{total_steps}-step run, so the sparsity coefficient never reaches its value; give it as a "
                     "fraction of the run (below 1) or train longer")
    return lines
