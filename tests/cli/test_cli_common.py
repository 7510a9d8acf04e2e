"""cli/common.py: which SAE config fields are --sae-FIELD options. (Not test_common.py: test file
names must be unique across tests/, and tests/jobs has one.)"""

from __future__ import annotations

import argparse
import dataclasses

from jumpscope import sae as sae_module
from jumpscope.cli.common import add_sae_arguments


def test_sae_fields_the_training_jobs_set_are_no_sae_options() -> None:
    parser = argparse.ArgumentParser(prog="prog")
    add_sae_arguments(parser)
    for name in sae_module.architectures():
        cls = sae_module.config_class(name)
        assert set(cls.job_fields) <= {f.name for f in dataclasses.fields(cls)}
        assert not {f"--sae-{field.replace('_', '-')}" for field in cls.job_fields} & set(parser._option_string_actions)
    assert "--sae-lr" in parser._option_string_actions
