"""Trainer configuration: what the loop does, independent of any architecture.

Optimiser hyperparameters (lr, betas, warm-ups) live in each SAE's own config, so a sweep over
architectures trains each with its own defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..errors import ConfigError, check_positive


@dataclass
class TrainerConfig:
    """How long to train, how to batch, log and checkpoint."""

    total_tokens: int = 10_000_000
    """Activation vectors (tokens) to train on; the run stops early if the data runs out."""

    batch_size: int = 4096
    """Tokens per optimiser step. Incoming batches of any size are re-chunked to this."""

    init_sample_tokens: int = 16_384
    """Tokens, taken from the start of the stream, used to estimate the input scale and for
    data-dependent initialisation (e.g. JumpReLU thresholds). They are trained on as well."""

    dead_tokens: int | None = None
    """A latent that has not fired for this many tokens is dead (drives AuxK and the dead
    fraction in the log). None: 10M tokens, capped at a quarter of total_tokens."""

    final_metrics_tokens: int | None = None
    """Tokens at the end of training over which the final metrics and feature densities are
    measured. None: the last 10% of the run, at most 2M tokens."""

    calibration_tokens: int = 8192
    """Training rows, spread evenly over the run, on which each SAE calibrates after the last
    step on its saved weights (JumpReLU: its thresholds to target_l0); kept in the checkpoint."""

    decoder_refit_tokens: int = 0
    """Refit each SAE's decoder by least squares after the last step, its codes fixed, on this many
    training rows spread evenly over the run (train/decoder_refit.py); 0: no refit. Lowers FVU
    (MiniLM, 500k tokens, width 8192: -11%) but raised stories260K's delta LM loss (JumpReLU, L0
    32: +37%), so it is off by default. The rows are float32 on the host (768 MB per 500k rows at
    d_in 384), in the output folder while the run lasts; fewer are kept where its disk (without a
    folder, half the free memory) cannot hold them. Widths above 16,384, or a float64 width^2
    system larger than the free memory (2 GiB at 16,384), keep the trained decoder, with a warning."""

    keep_training_point_margin: float | None = 0.1
    """Under schedule-free averaging, save the training point instead of the average when its FVU
    on the calibration rows is lower by more than this fraction (long runs: MiniLM, 1953 steps,
    TopK 0.135 against 0.171); None: always the average. See train/calibration.py."""

    log_every: int = 50
    """Write a JSONL log line (and refresh the progress bar) every this many steps."""

    checkpoint_every: int = 1000
    """Save a resumable checkpoint every this many steps (0: only at the end)."""

    out_dir: str | None = None
    """Folder for checkpoints, the JSONL log and the trained SAEs; None keeps them in memory."""

    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""

    prefetch: bool = True
    """On CUDA, copy the next host batch to the GPU while this step computes (pinned host memory,
    a side stream): an H200 under bf16 autocast trains 1.3-1.9x the tokens/s of a copy in the step
    at 16384 latents, 1.1-1.2x at 65536 (benchmarks/README.md, "On a GPU"), with the same weights
    bit for bit. It costs one more batch on the GPU. Ignored elsewhere."""

    reuse_cpu_memory: bool = True
    """On the CPU (Linux, glibc), keep freed blocks of up to 1 GiB for reuse instead of returning
    them to the system (device.reuse_freed_cpu_memory): each step's large tensors then skip the
    kernel's page faults, a quarter off a MiniLM step at width 2048. Process-wide once set."""

    autocast: Literal["none", "bf16"] = "none"
    """Mixed precision. CUDA: autocast of the SAE forward (an H200: FVU as float32's at width
    16384; 1.5-3.4x the tokens/s on the dense path at 16384-65536; benchmarks/README.md, "On a
    GPU"). CPU with native bf16 products (AMX, AVX512-BF16): the sparse kernels choose their
    entries on bf16 pre-activations (values at the entries float32) and gather the decoder and
    weight-gradient products from bf16 tables (about 1.3-1.8x faster steps, gradients within
    about 4e-3 of float32's; sae/mixed.py). Else float32."""

    progress: bool = True
    """Show a progress bar."""

    distribute: Literal["data", "saes"] = "data"
    """Under torchrun (several processes): 'data' gives each process a slice of every batch and
    sums the gradients, so the SAEs train as on one process with the whole batch; 'saes' gives
    each process its own SAEs (round robin by name; their number must be a multiple of the
    number of processes), each fed every batch. Ignored in a single process."""

    def __post_init__(self) -> None:
        check_positive(self, "total_tokens", "batch_size", "init_sample_tokens", "log_every", "dead_tokens",
                 "final_metrics_tokens", "calibration_tokens")
        check_positive(self, "checkpoint_every", "decoder_refit_tokens", zero_ok=True)
        if self.keep_training_point_margin is not None and not 0 <= self.keep_training_point_margin < 1:
            raise ConfigError(f"keep_training_point_margin must lie in [0, 1) or be None, got "
                              f"{self.keep_training_point_margin}")
        if self.total_tokens < self.batch_size:
            raise ConfigError(f"total_tokens ({self.total_tokens}) is smaller than one batch "
                              f"(batch_size {self.batch_size})")
        if self.autocast not in ("none", "bf16"):
            raise ConfigError(f"autocast must be 'none' or 'bf16', got {self.autocast!r}")
        if self.distribute not in ("data", "saes"):
            raise ConfigError(f"distribute must be 'data' or 'saes', got {self.distribute!r}")

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    @property
    def dead_window(self) -> int:
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(self.batch_size, min(10_000_000, self.total_tokens // 4))

    @property
    def final_metrics_window(self) -> int:
        if self.final_metrics_tokens is not None:
            return self.final_metrics_tokens
        return max(self.batch_size, min(2_000_000, self.total_tokens // 10))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
