"""The scripts in examples/ run as a user would run them, and do what they say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jumpscope

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_train_on_text_trains_saves_loads_and_encodes(tmp_path):
    out = tmp_path / "sae"
    done = subprocess.run([sys.executable, str(EXAMPLES / "train_on_text.py"), "--tokens", "20000", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"held out \((\d+) tokens\): L0 ([\d.]+) \(target 32\), FVU ([\d.]+)", done.stdout)
    assert match, done.stdout
    tokens, l0, fvu = int(match[1]), float(match[2]), float(match[3])
    assert tokens >= 1000
    assert 8 < l0 < 128  # sparse, near the requested L0 after 20 steps (far below d_sae = 1536)
    assert fvu < 0.9  # it reconstructs held-out tokens better than their mean does (FVU 1)
    sae = jumpscope.load(out)  # the saved folder is an ordinary SAE
    assert (sae.architecture, sae.cfg.site, sae.cfg.d_sae) == ("jumprelu", "layers.3.resid_post", 1536)
    assert len(re.findall(r"top latents \[", done.stdout)) == 8
