"""The training loop. It knows no architecture: it calls the SAE base class's ``loss``, decoder-norm
helpers, ``init_from_data``, ``after_step``, ``calibrate`` and ``fold_scaling``, and nothing else.

Many SAEs train at once on the same batches (a sweep pays for the data once); each has its own
Adam, schedules and input scale. A killed run resumes from its last checkpoint and ends with
the same weights as an uninterrupted one, given the same data in the same order.

Under torchrun the processes split each batch (``distribute="data"``) or the SAEs
(``distribute="saes"``); see distributed.py. Either way the checkpoint is one file, written by
the main process, with the same layout as a one-process run's, so any of them resumes it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from ..data.batch import INPUT, TARGET, Batch
from ..device import resolve_device, reuse_freed_cpu_memory
from ..sae.base import SAE, StepContext
from ..sae.metrics import StreamingMetrics, batch_fvu
from ..sae.mixed import bf16_selection_available
from .batches import check_finite, copied_ahead, estimate_scale, rebatch
from .calibration import CalibrationSample, finish_point, refit_point, share_refit
from .checkpoint import TrainingState, load_training, resume_configs, save_training
from .config import TrainerConfig
from .distributed import (SingleProcess, any_process, assign_saes, gather_by_name, process_group_from_env,
                          reduce_metrics, reduced_row, shard_batch, share_saes, share_scales, step_context)
from .optim import lr_factor, make_optimizer, peak_lr, schedule_warnings, sparsity_factor, use_average
from .progress import ProgressReporter
from .refit_rows import RefitRows

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "train_log.jsonl"


def name_saes(saes: SAE | Sequence[SAE] | Mapping[str, SAE]) -> dict[str, SAE]:
    if isinstance(saes, SAE):
        saes = [saes]
    named = dict(saes) if isinstance(saes, Mapping) else {f"{sae.architecture}_{i}": sae for i, sae in enumerate(saes)}
    if not named:
        raise ValueError("no SAEs to train")
    return named


class Trainer:
    def __init__(self, saes: SAE | Sequence[SAE] | Mapping[str, SAE], cfg: TrainerConfig | None = None,
                 process_group: SingleProcess | None = None,
                 inputs: Mapping[str, str | tuple[str, str]] | None = None, device: torch.device | None = None):
        """``inputs`` routes each SAE to the batch entry it reads, as a key or an (input, target)
        pair of keys. By default an SAE reads "input" (and a transcoder "target") of tensor or
        tuple batches, and its own ``cfg.site`` of dict batches. ``process_group`` defaults to
        the torchrun processes, if any (``process_group_from_env``). ``device``: one a job has
        already resolved; None resolves ``cfg.device`` (e.g. "auto")."""
        self.cfg = cfg or TrainerConfig()
        self.all_saes = name_saes(saes)
        self.device = device if device is not None else resolve_device(self.cfg.device)
        if self.device.type == "cpu" and self.cfg.reuse_cpu_memory:
            reuse_freed_cpu_memory()
        self.bf16_selection = bf16_selection_available(self.cfg.autocast == "bf16", self.device)  # sae/mixed.py
        # processes: every torchrun process; batch_sharers: those splitting each batch (reducing gradients)
        self.processes = process_group or process_group_from_env(self.device)
        by_sae = self.cfg.distribute == "saes"
        self.batch_sharers = self.processes if not by_sae else SingleProcess()
        self.owners = assign_saes(self.all_saes, self.processes.world_size) if by_sae else \
            {name: self.processes.rank for name in self.all_saes}
        self.saes = {name: sae for name, sae in self.all_saes.items() if self.owners[name] == self.processes.rank}
        if self.batch_sharers.world_size > self.cfg.batch_size:
            raise ValueError(f"batch_size ({self.cfg.batch_size}) is smaller than the number of processes sharing "
                             f"each batch ({self.batch_sharers.world_size})")
        unknown = sorted(set(inputs or {}) - set(self.all_saes))
        if unknown:
            raise ValueError(f"inputs name SAEs that are not being trained: {unknown}")
        self.explicit_routes = {name: (route, None) if isinstance(route, str) else tuple(route)
                                for name, route in (inputs or {}).items()}
        self.routes: dict[str, tuple[str, str | None]] = {}
        for sae in self.saes.values():
            sae.to(self.device).train()
        self.optimizers = {n: make_optimizer(s, self.cfg.batch_size, self.cfg.total_steps) for n, s in self.saes.items()}
        self.step = 0
        self.input_scales: dict[str, float] = {}
        self.output_scales: dict[str, float] = {}
        self.since_fired = {n: torch.zeros(s.cfg.d_sae, dtype=torch.int64, device=self.device)
                            for n, s in self.saes.items()}
        self.final_metrics = {n: StreamingMetrics(s.cfg.d_sae, s.cfg.d_output, self.device)
                              for n, s in self.saes.items()}
        self.out_dir = Path(self.cfg.out_dir) if self.cfg.out_dir else None
        self.batch_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.calibration_sample: CalibrationSample | None = None  # once the routes are known
        self.refit_rows: RefitRows | None = None  # likewise
        self.calibrations: dict[str, dict[str, float]] = {}  # what each SAE's calibration changed
        self.loss_finite = {name: torch.ones((), dtype=torch.bool, device=self.device) for name in self.saes}

    # -- public -------------------------------------------------------------------------------
    def fit(self, batches: Iterable, resume: bool = False) -> dict[str, SAE]:
        """Train on ``batches``; returns the SAEs with the input scale folded in (raw inputs)."""
        items = iter(batches)
        first = next(items, None)
        if first is None:
            raise ValueError("no activation batches were given")
        self._resolve_routes(first)
        batches = itertools.chain([first], items)
        checkpoint = self.out_dir / CHECKPOINT_FILE if self.out_dir else None  # the main process writes it
        if checkpoint is not None and checkpoint.exists():
            if not resume:
                raise FileExistsError(f"{checkpoint} exists: pass resume=True (--resume) to continue that run, "
                                      "or choose another output folder")
            self._load(checkpoint)
            log.info("resuming from step %d (%d tokens)", self.step, self.step * self.cfg.batch_size)
        cfg, first_step = self.cfg, self.step
        if self.step == 0 and self.processes.is_main:
            for name, sae in self.saes.items():
                for line in schedule_warnings(name, sae, cfg.total_steps):
                    log.warning(line)
        if self.step >= cfg.total_steps:  # a finished run: nothing to replay
            batches = iter(())
        stream = rebatch(batches, cfg.batch_size, self.widths, start_row=self.step * cfg.batch_size)
        if not self.input_scales:
            stream = self._initialise(stream)
        stream = itertools.islice(stream, max(cfg.total_steps - self.step, 0))  # none past the last step
        stream = copied_ahead(stream, self.device) if cfg.prefetch else stream
        is_main = self.processes.is_main
        reporter = ProgressReporter(self.out_dir / LOG_FILE if self.out_dir and is_main else None,
                                    total=cfg.total_steps, start=self.step, enabled=cfg.progress and is_main,
                                    truncate_after=self.step, dead_window=cfg.dead_window,
                                    sites={name: sae.cfg.target_site or sae.cfg.site or name
                                           for name, sae in self.all_saes.items()})
        with reporter:
            for batch in stream:
                if self.step >= cfg.total_steps:
                    break
                if self.device.type == "cpu":  # free here: fail now, naming the step
                    check_finite(batch, self.step)
                else:  # an on-device flag, read at the sync points below (no host sync per batch)
                    self.batch_finite &= torch.stack([torch.isfinite(v).all() for v in batch.values()]).all().to(
                        self.device)
                rows = self._train_step(batch)
                self.step += 1
                if self.step == cfg.total_steps:  # before the last log line and checkpoint
                    self._calibrate()
                logging_step = self.step % cfg.log_every == 0 or self.step == cfg.total_steps
                checkpoint_step = checkpoint is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                if logging_step or checkpoint_step or self.device.type == "cpu":
                    self._raise_if_nonfinite()
                if logging_step:
                    reporter.report(self.step, self.step * cfg.batch_size, self._gather_rows(rows))
                if checkpoint_step:
                    self._save(checkpoint)
        if self.step < cfg.total_steps:
            log.warning("the data ran out after %d of %d steps", self.step, cfg.total_steps)
            if self.step > first_step:  # trained here: the SAEs end now
                self._calibrate()
        if checkpoint is not None:
            self._save(checkpoint)
        if self.step >= cfg.total_steps or self.step > first_step:  # its checkpoint holds the refit SAEs
            self.refit_rows.remove()
        return self._finish()

    def _resolve_routes(self, first_item: Any) -> None:
        dict_batches = isinstance(first_item, Mapping)
        for name, sae in self.all_saes.items():
            if name in self.explicit_routes:
                route = self.explicit_routes[name]
            elif dict_batches:
                if sae.cfg.site is None:
                    raise ValueError(f"SAE {name!r} has no cfg.site to pick its entry of dict batches "
                                     f"(keys {sorted(first_item)}); set it or pass inputs={{{name!r}: key}}")
                route = (sae.cfg.site, sae.cfg.target_site)  # a transcoder predicts its target site
            else:
                transcoder = sae.cfg.d_out is not None or sae.cfg.target_site is not None
                route = (INPUT, TARGET if transcoder else None)  # as_batch's keys for tensors and pairs
            if (sae.cfg.d_out is not None or sae.cfg.target_site is not None) and route[1] is None:
                raise ValueError(f"transcoder {name!r} needs a target entry: pass inputs={{{name!r}: (input, target)}}")
            self.routes[name] = route
        widths: dict[str, int] = {}
        for name, sae in self.all_saes.items():
            input_key, target_key = self.routes[name]
            for key, width in ((input_key, sae.cfg.d_in), (target_key, sae.cfg.d_output)):
                if key is not None and widths.setdefault(key, width) != width:
                    raise ValueError(f"SAEs reading {key!r} disagree on its width: {widths[key]} vs {width} "
                                     f"({name!r})")
        self.widths = widths
        keys = [key for name in self.all_saes for key in self.routes[name] if key]
        self.calibration_sample = CalibrationSample(keys, self.cfg.calibration_tokens, self.cfg.total_steps,
                                                    self.cfg.batch_size)
        refits = self.batch_sharers.is_main and any(sae.refits_decoder for sae in self.saes.values())
        self.refit_rows = RefitRows(keys, self.cfg.decoder_refit_tokens if refits else 0,
                                    self.cfg.total_steps, self.cfg.batch_size, self.out_dir, self.processes.rank)

    def final_summary(self) -> dict[str, dict[str, Any]]:
        """Metrics over the last ``final_metrics_window`` tokens, per SAE, in raw units."""
        return {name: {**metrics.compute(), **{f"calibration_{k}": v for k, v in self.calibrations.get(name, {}).items()}}
                for name, metrics in self.final_metrics.items() if metrics.n_tokens}

    # -- steps --------------------------------------------------------------------------------
    def _initialise(self, stream: Iterator[Batch]) -> Iterator[Batch]:
        """Estimate each SAE's input scale on the first tokens and run data-dependent inits."""
        sample_batches: list[Batch] = []
        rows = 0
        for batch in stream:
            sample_batches.append(batch)
            rows += next(iter(batch.values())).shape[0]
            if rows >= self.cfg.init_sample_tokens:
                break
        if not sample_batches:
            raise ValueError("no activation batches were given")
        sample = {key: torch.cat([b[key] for b in sample_batches]).to(self.device, torch.float32)
                  for key in self.widths}
        check_finite(sample, step=0)
        for name, sae in self.saes.items():
            input_key, target_key = self.routes[name]
            convention = sae.cfg.input_scaling
            self.input_scales[name] = estimate_scale(sample[input_key], convention)
            self.output_scales[name] = estimate_scale(sample[target_key], convention) if target_key else \
                self.input_scales[name]
            sae.init_from_data(sample[input_key] / self.input_scales[name])
            self.batch_sharers.broadcast_module(sae)
        self.input_scales, self.output_scales = self.batch_sharers.broadcast_object(
            (self.input_scales, self.output_scales))

        def replay() -> Iterator[Batch]:
            yield from sample_batches
            yield from stream

        return replay()

    def _autocast(self) -> contextlib.AbstractContextManager:
        cuda = self.cfg.autocast == "bf16" and self.device.type == "cuda"  # the CPU's bf16: bf16_selection
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def _train_step(self, batch: Batch) -> dict[str, dict[str, float]]:
        cfg = self.cfg
        total = cfg.total_steps
        batch = {key: value.to(self.device, torch.float32, non_blocking=True) for key, value in batch.items()}
        self.calibration_sample.add(self.step, batch)  # from the whole batch: the same on every process
        self.refit_rows.add(self.step, batch)
        sharers = self.batch_sharers
        batch, weight = shard_batch(batch, sharers.rank, sharers.world_size)  # this process's rows
        logging_step = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == total
        in_final_window = (total - self.step) * cfg.batch_size <= cfg.final_metrics_window
        rows: dict[str, dict[str, float]] = {}
        for name, sae in self.saes.items():
            sae_cfg = sae.cfg
            inputs = batch[self.routes[name][0]]
            targets = batch[self.routes[name][1]] if self.routes[name][1] else None
            scale_in, scale_out = self.input_scales[name], self.output_scales[name]
            target_scaled = targets / scale_out if targets is not None else None
            ctx = step_context(sharers, weight, cfg.batch_size, step=self.step, progress=self.step / max(total, 1),
                               input_scale=scale_in, output_scale=scale_out,
                               sparsity_scale=sparsity_factor(self.step, total, sae_cfg.sparsity_warmup_steps),
                               dead_mask=self.since_fired[name] >= cfg.dead_window, bf16_selection=self.bf16_selection)
            with self._autocast():
                out = sae.loss(inputs / scale_in, ctx, target_scaled)
            self.loss_finite[name] &= torch.isfinite(out.loss.detach())  # no host sync here
            optimizer = self.optimizers[name]
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            sharers.reduce_gradients(sae, weight)
            sae.remove_parallel_decoder_grad()
            if sae_cfg.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), sae_cfg.grad_clip_norm)
            lr = peak_lr(sae, total) * lr_factor(self.step, total, sae_cfg.lr_warmup_steps, sae_cfg.lr_decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            sae.normalize_decoder_rows()
            sae.after_step()

            fired = sharers.all_reduce_max_(out.fired_latents().to(torch.int64)).bool()
            self.since_fired[name] += cfg.batch_size
            self.since_fired[name][fired] = 0
            if in_final_window:
                reference = targets if targets is not None else inputs
                self.final_metrics[name].update(reference, out.reconstruction.detach().float() * scale_out,
                                                out.acts)  # only whether each act is > 0 is read
            if logging_step:
                reference = target_scaled if target_scaled is not None else inputs / scale_in
                if sharers.world_size > 1:
                    values = reduced_row(sharers, weight, out.loss, out.terms, out.mean_l0(), reference,
                                         out.reconstruction)
                else:
                    values = {"loss": out.loss.item(), **{k: v.item() for k, v in out.terms.items()},
                              "l0": out.mean_l0().item(),
                              "fvu": batch_fvu(reference, out.reconstruction.detach().float())}
                rows[name] = {
                    **values,
                    "dead_fraction": (self.since_fired[name] >= cfg.dead_window).float().mean().item(),
                    "lr": lr, "sparsity_scale": ctx.sparsity_scale,
                }
        return rows

    def _calibrate(self) -> None:
        """On the sample of training rows (the same on every process: no collectives), each SAE's
        better of average and training point (``finish_point``), then its ``calibrate``."""
        sample = self.calibration_sample
        for name, sae in self.saes.items():
            scale_in, scale_out = self.input_scales[name], self.output_scales[name]
            input_key, target_key = self.routes[name]
            rows = sample.sample(input_key) / scale_in
            targets = sample.sample(target_key) / scale_out if target_key else rows
            ctx = StepContext(step=self.step, input_scale=scale_in, output_scale=scale_out)
            note = finish_point(sae, self.optimizers[name], rows, targets, ctx, self.cfg.keep_training_point_margin)
            if len(self.refit_rows):  # this process kept rows (under data parallelism the main one)
                pairs = self.refit_rows.pairs(input_key, target_key, scale_in, scale_out, self.device)
                note.update(refit_point(sae, self.optimizers[name], pairs, f"SAE {name!r}"))
            share_refit(self.batch_sharers, sae, self.optimizers[name], "refit_fvu_after" in note)
            if note:
                self.calibrations[name] = note
                if self.processes.is_main:
                    log.info("SAE %r calibrated on %d training rows spread over the run: %s", name, len(sample),
                             ", ".join(f"{k} {v:.4g}" for k, v in note.items()))

    def _raise_if_nonfinite(self) -> None:
        """Fail on NaN/inf before anything is logged or checkpointed (one host sync); every
        process stops at the same step when any of them found one."""
        bad_batch = not bool(self.batch_finite)
        bad_losses = [name for name, finite in self.loss_finite.items() if not bool(finite)]
        if any_process(self.processes, bad_batch or bool(bad_losses), self.device) and not (bad_batch or bad_losses):
            raise FloatingPointError(f"another process found NaN or inf at or before step {self.step}; see its "
                                     "error. The last checkpoint is intact.")
        if bad_batch:
            raise ValueError(f"non-finite activations (NaN or inf) in a batch at or before step {self.step}; "
                             "check the model's dtype (fp16 overflow?) or the cache. The last checkpoint is intact.")
        if bad_losses:
            name = bad_losses[0]
            raise FloatingPointError(
                f"SAE {name!r}: the loss became NaN or inf at or before step {self.step}; lower its learning "
                f"rate (lr={self.saes[name].cfg.lr}) or check the activations. The last checkpoint is intact.")

    def _gather_rows(self, rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """Every SAE's log values on the main process (under data parallelism every process
        already has them: the whole batch's)."""
        if self.batch_sharers is self.processes:
            return rows
        return gather_by_name(self.processes, rows, self.all_saes) or {}

    # -- checkpoints ----------------------------------------------------------------------------
    def _save(self, path: Path) -> None:
        """One file for every SAE, as one process writes it (collective: every process calls it)."""
        sharers = self.batch_sharers
        by_sae = sharers is not self.processes
        self.refit_rows.flush()  # every process's files hold the rows the checkpoint counts
        parts = {name: TrainingState(self.saes[name], self.optimizers[name], self.since_fired[name],
                                     reduce_metrics(self.final_metrics[name], sharers), self.input_scales[name],
                                     self.output_scales[name]).portable(to_cpu=by_sae)
                 for name in self.saes}
        if by_sae:  # each process has its own SAEs: gather them on the main one
            parts = gather_by_name(self.processes, parts, self.all_saes)
        if self.processes.is_main:
            save_training(path, self.step, parts, list(self.all_saes), self.cfg.to_dict(),
                          resume_configs(self.all_saes), {**self.calibration_sample.state(), **self.refit_rows.state()})

    def _load(self, path: Path) -> None:
        step, states, input_scales, output_scales, trainer_tensors = load_training(
            path, resume_configs(self.all_saes), {key: getattr(self.cfg, key) for key in ("batch_size", "total_tokens")})
        keeps_metrics = self.batch_sharers.is_main  # one process per batch holds the reduced metrics
        for name, sae in self.saes.items():
            self.since_fired[name] = states[name].restore(sae, self.optimizers[name],
                                                          self.final_metrics[name] if keeps_metrics else None,
                                                          self.device)
        self.step = step
        self.input_scales, self.output_scales = input_scales, output_scales
        self.calibration_sample.restore(trainer_tensors, self.device)
        self.refit_rows.restore(trainer_tensors, finished=step >= self.cfg.total_steps)

    # -- output -------------------------------------------------------------------------------
    def _finish(self) -> dict[str, SAE]:
        """Fold the input scales, write the SAE folders (each process those it trained, once)
        and return every SAE, on every process. The run's summary is the caller's to write
        (``final_summary()``); the trainer's own files are only what resuming needs."""
        for name in self.saes:
            self.final_metrics[name] = reduce_metrics(self.final_metrics[name], self.batch_sharers)
        summary = self.final_summary()
        for name, sae in self.saes.items():
            use_average(self.optimizers[name])  # schedule-free: the averaged weights are the SAE
            sae.unit_decoder_rows_exactly()  # an average of unit rows, or a refit decoder, is not unit
            sae.fold_scaling(self.input_scales[name], self.output_scales[name])
            sae.eval()
        if self.out_dir is not None and self.batch_sharers.is_main:
            from ..formats.native import save_native  # the trainer writes artifacts; formats never import train

            for name, sae in self.saes.items():
                metrics = self.final_metrics[name]
                density = {"firing_counts": metrics.firing_counts.cpu(), "n_tokens": metrics.n_tokens}
                metadata = {"input_scale": self.input_scales[name], "output_scale": self.output_scales[name],
                            "tokens_trained": self.step * self.cfg.batch_size, "final_metrics": summary.get(name)}
                save_native(sae, self.out_dir / name, density=density if metrics.n_tokens else None,
                            metadata=metadata)
        if self.batch_sharers is not self.processes:  # each process trained its own SAEs: give every one all
            self.final_metrics = share_saes(self.processes, self.all_saes, self.owners, self.final_metrics, self.device)
            self.input_scales, self.output_scales = share_scales(self.processes, self.input_scales, self.output_scales)
        return self.all_saes
