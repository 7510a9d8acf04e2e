"""What the four training jobs (train, sweep, suite, jsae) share: their common options, the checks
of an architecture and sparsity, and the preamble and training step every one of them runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..activations import ActivationConfig, ActivationSource, load_source_model
from ..device import resolve_device
from ..errors import ConfigError
from ..evaluate.downstream import ABLATIONS, parse_ablations
from ..models.loading import LoadedModel
from ..sae import SAE, architectures, config_class
from ..train import Trainer, TrainerConfig
from ..train.distributed import process_group_from_env

__all__ = ["TrainingJobConfig", "JobStart", "check_arch", "check_sparsity_fits", "start_training_job",
           "train_on_activations", "trainer_config", "job_record"]


@dataclass
class TrainingJobConfig:
    """The options every training job has; each job adds its own in front and may change the
    defaults (its own output folder, its held-out size)."""

    tokens: int = 300_000
    """Activation vectors every SAE trains on."""

    out: str = "runs/train"
    """Output folder."""

    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', ..."""

    resume: bool = False
    """Continue the run in --out from its last checkpoint (a finished run is only re-evaluated;
    with no checkpoint the run starts fresh)."""

    eval_tokens: int = 16_384
    """Held-out tokens every trained SAE is evaluated on (metrics and the model's own measure
    with it spliced in)."""

    ablations: tuple[str, ...] = ABLATIONS
    """Ablations the held-out CE loss recovered is measured against: zero,mean, zero, mean or
    none (no CE-recovered columns; two model passes fewer per site)."""

    # The job fills these itself when it starts (trainer_config), so they are not options.
    trainer: TrainerConfig = field(default_factory=TrainerConfig,
                                   metadata={"exclude": ("total_tokens", "out_dir", "device")})
    """How the SAEs train (batch size, logging, checkpoints, ...); its total_tokens, out_dir and
    device are the job's --tokens, output folder and device."""


def check_arch(arch: str, command: str) -> None:
    """An architecture ``jumpscope {command}`` can train (one that does not train alone has its own command)."""
    if arch not in architectures():
        trainable = (name for name in architectures() if config_class(name).trains_alone)
        raise ConfigError(f"unknown arch {arch!r}; choose from {', '.join(trainable)}")
    cls = config_class(arch)
    if not cls.trains_alone:
        raise ConfigError(f"{cls.own_job_hint}, not `jumpscope {command}`")


def check_sparsity_fits(width: int | None, *, target_l0: float | None = None, k: int | None = None,
                        l0: tuple[float, ...] = ()) -> None:
    """A requested L0 (or k) must be below the number of latents when that is given (with the
    default 8 x d_in the SAE's own config checks it once d_in is known)."""
    if width is None:
        return
    if target_l0 is not None and target_l0 >= width:
        raise ConfigError(f"target_l0 ({target_l0:g}) must be smaller than width ({width})")
    if k is not None and k > width:
        raise ConfigError(f"k ({k}) cannot exceed width ({width})")
    if any(level >= width for level in l0):
        raise ConfigError(f"every l0 level must be smaller than width ({width}), got {max(l0):g}")


def trainer_config(job: TrainingJobConfig, out_dir: Path | str | None, device: str | torch.device) -> TrainerConfig:
    """``job.trainer`` with the fields the job fills itself (its ``trainer`` field's metadata
    ``exclude``); jobs build it before loading the model, so a careless trainer option fails at once."""
    return dataclasses.replace(job.trainer, total_tokens=job.tokens, out_dir=None if out_dir is None else str(out_dir),
                               device=str(device))


def job_record(job: TrainingJobConfig) -> dict[str, Any]:
    """The job's options as its summary records them: without the nested trainer config, whose
    total_tokens, out_dir and device are not this run's until the job fills them in."""
    return {key: value for key, value in dataclasses.asdict(job).items() if key != "trainer"}


@dataclass
class JobStart:
    """What a training job's preamble gives it: the activation config, the device (resolved once
    here and passed down), the trainer config (filled in for this run) and the loaded model."""

    activations: ActivationConfig
    device: torch.device
    trainer: TrainerConfig
    loaded: LoadedModel

    def source(self, sites: Any) -> ActivationSource:
        """The activation source of ``sites`` on the already loaded model; under torchrun each
        process runs the model on its own share of the text."""
        return ActivationSource(self.activations, sites, device=str(self.device), loaded=self.loaded,
                                processes=process_group_from_env(self.device))


def start_training_job(job: TrainingJobConfig, activations: ActivationConfig | None,
                       training_dir: Path | str) -> JobStart:
    """Resolve the device, fill in the trainer config (a careless trainer option fails before the
    model loads), then load the model."""
    activations = activations or ActivationConfig()
    parse_ablations(job.ablations)  # a careless --ablations fails before the model loads
    device = resolve_device(job.device)
    trainer = trainer_config(job, training_dir, device)
    return JobStart(activations, device, trainer, load_source_model(activations, str(device)))


def train_on_activations(saes: dict[str, SAE], source: ActivationSource, job: TrainingJobConfig, start: JobStart,
                         inputs: dict[str, tuple[str, str]] | None = None) -> tuple[Trainer, dict[str, SAE]]:
    """Train ``saes`` together for ``job.tokens`` on ``source``'s stream (one model pass or cache
    read feeds them all), checkpointing to the folder of ``start.trainer`` and resuming with
    ``job.resume``; every job goes through here, so checkpoints, resume and torchrun behave the
    same everywhere."""
    trainer_cfg = start.trainer
    trainer = Trainer(saes, trainer_cfg, inputs=inputs, device=start.device)
    progress = trainer_cfg.progress and trainer.processes.is_main
    return trainer, trainer.fit(source.training_stream(job.tokens, trainer_cfg.batch_size, progress),
                                resume=job.resume)
