"""kill -9 in the middle of a long job, then ``--resume``: the results equal an uninterrupted run's.

Each test runs the real command line in subprocesses on a tiny llama2.c model: an uninterrupted
reference run and a victim side by side, the victim killed with SIGKILL as soon as its first
resumable state is on disk (polled; while the run is still far from done), then the victim's
command again with ``--resume``. The runs are sized (many small shards, frequent state saves) so
that the kill lands mid-way, and the test fails rather than passing vacuously if the victim had
already finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import jumpscope
from jumpscope.safeio import read_safetensors_metadata
from tiny_causal_lm import write_corpus, write_tiny_causal_lm

SITE = "layers.1.resid_post"
# One thread: the same float reductions in every run (and less contention on a shared machine).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
START_TIMEOUT = 60.0  # seconds for a run to write its first state (python and torch start slowly)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    model = write_tiny_causal_lm(root / "model")
    corpus = write_corpus(root / "corpus.txt", n_docs=1000)  # about 90k tokens
    sae = jumpscope.build("relu", d_in=32, d_sae=128, site=SITE, model=str(model))
    with torch.no_grad():  # latents that fire at different rates, so the examples differ
        sae.W_enc.copy_(torch.randn(32, 128, generator=torch.Generator().manual_seed(0)))
        sae.b_enc.copy_(-torch.linspace(0.0, 3.0, 128))
    jumpscope.save(sae, root / "sae", format="native")
    return root, model, corpus


def start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as handle:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen([sys.executable, "-m", "jumpscope", *argv], stdout=handle, stderr=subprocess.STDOUT,
                                env=ENV)


def finish(process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    assert process.wait(timeout) == 0, log.read_text(errors="replace")[-3000:]


def kill_when(process: subprocess.Popen, ready, log: Path) -> float:
    """SIGKILL ``process`` as soon as ``ready()``; returns the seconds waited. Fails if the run
    ends first (it was too short to interrupt) or nothing is ready within START_TIMEOUT."""
    started = time.monotonic()
    while not ready():
        assert process.poll() is None, f"the run ended before it could be killed:\n{log.read_text(errors='replace')}"
        assert time.monotonic() - started < START_TIMEOUT, "no resumable state appeared in time"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL
    return time.monotonic() - started


def dashboard_argv(tiny, out: Path, *extra: str) -> list[str]:
    root, model, corpus = tiny
    return ["dashboard", str(root / "sae"), "--model", str(model), "--corpus", str(corpus), "--txt-split", "paragraph",
            "--context-size", "32", "--model-batch-size", "4", "--n-top", "5", "--n-sample", "3", "--tokens", "40000",
            "--checkpoint-every", "20", "--device", "cpu", "--out", str(out), *extra]


def test_dashboard_killed_while_scanning_resumes_to_the_same_examples(tiny, tmp_path):
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    ref = start(dashboard_argv(tiny, reference), tmp_path / "reference.log")
    run = start(dashboard_argv(tiny, victim), tmp_path / "victim.log")
    kill_when(run, lambda: (victim / "state" / "state.safetensors").is_file(), tmp_path / "victim.log")
    state = json.loads(read_safetensors_metadata(victim / "state" / "state.safetensors")["counters"])
    assert 0 < state["n_tokens"] < 40000 and not (victim / "examples").exists()  # killed mid-scan
    finish(ref, tmp_path / "reference.log")
    assert "max-activating examples" in (tmp_path / "reference.log").read_text()  # the scan shows its progress
    resumed = start(dashboard_argv(tiny, victim, "--resume"), tmp_path / "resumed.log")
    finish(resumed, tmp_path / "resumed.log")
    for name in ("examples/examples.safetensors", "examples/examples.json", "logit_lens.safetensors"):
        assert (victim / name).read_bytes() == (reference / name).read_bytes(), name
    assert json.loads((victim / "summary.json").read_text())["n_tokens"] == \
        json.loads((reference / "summary.json").read_text())["n_tokens"]


def train_argv(tiny, out: Path, cache: Path, *extra: str) -> list[str]:
    _, model, corpus = tiny
    return ["train", "--model", str(model), "--corpus", str(corpus), "--txt-split", "paragraph", "--context-size",
            "32", "--model-batch-size", "4", "--site", SITE, "--width", "64", "--target-l0", "4", "--tokens", "24000",
            "--batch-size", "256", "--init-sample-tokens", "512", "--shuffle-buffer-tokens", "2048",
            "--eval-tokens", "512", "--cache", str(cache), "--cache-shard-rows", "256", "--device", "cpu",
            "--no-progress", "--out", str(out), *extra]


def test_train_killed_while_writing_its_cache_resumes_to_the_same_sae(tiny, tmp_path):
    ref = start(train_argv(tiny, tmp_path / "reference", tmp_path / "reference_cache"), tmp_path / "reference.log")
    cache = tmp_path / "victim_cache"
    run = start(train_argv(tiny, tmp_path / "victim", cache), tmp_path / "victim.log")

    def first_shard_recorded() -> bool:  # the manifest lists a whole shard: a resume starts after it
        try:
            return len(json.loads((cache / "manifest.json").read_text())["shards"]) >= 1
        except (OSError, ValueError, KeyError):
            return False

    kill_when(run, first_shard_recorded, tmp_path / "victim.log")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert not manifest.get("complete") and len(manifest["shards"]) < 24000 // 256  # killed mid-write
    finish(ref, tmp_path / "reference.log")
    resumed = start(train_argv(tiny, tmp_path / "victim", cache, "--resume"), tmp_path / "resumed.log")
    finish(resumed, tmp_path / "resumed.log")
    ours = json.loads((cache / "manifest.json").read_text())
    theirs = json.loads((tmp_path / "reference_cache" / "manifest.json").read_text())
    assert [s["sha256"] for s in ours["shards"]] == [s["sha256"] for s in theirs["shards"]]
    weights = sorted((tmp_path / "reference" / SITE).glob("*.safetensors"))
    assert weights
    for path in weights:
        expected, got = load_file(path), load_file(tmp_path / "victim" / SITE / path.name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (path.name, key)
