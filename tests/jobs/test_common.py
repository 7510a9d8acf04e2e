"""What the training jobs share: the nested trainer config and the fields the job fills in."""

import dataclasses

import pytest

from jumpscope.errors import ConfigError
from jumpscope.jobs.common import TrainingJobConfig, job_record, trainer_config
from jumpscope.train import TrainerConfig


def test_the_job_fills_exactly_the_trainer_fields_that_are_not_options():
    job = TrainingJobConfig(tokens=8192, trainer=TrainerConfig(batch_size=256, log_every=7))
    filled = trainer_config(job, "runs/x", "cpu")
    changed = {f.name for f in dataclasses.fields(TrainerConfig) if getattr(filled, f.name) != getattr(job.trainer, f.name)}
    not_options = next(f for f in dataclasses.fields(TrainingJobConfig) if f.name == "trainer").metadata["exclude"]
    assert changed == set(not_options)
    assert (filled.total_tokens, filled.out_dir, filled.device, filled.batch_size, filled.log_every) == (
        8192, "runs/x", "cpu", 256, 7)


def test_a_careless_trainer_option_fails_when_the_job_fills_it_in():
    with pytest.raises(ConfigError, match="smaller than one batch"):
        trainer_config(TrainingJobConfig(tokens=100, trainer=TrainerConfig(batch_size=512)), None, "cpu")


def test_summaries_record_the_job_without_its_unfilled_trainer():
    record = job_record(TrainingJobConfig())
    assert "trainer" not in record and record["tokens"] == 300_000
