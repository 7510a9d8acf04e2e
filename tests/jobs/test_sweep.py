"""`jumpscope sweep`: one activation stream trains every point; JSON, plots and report come out."""

import json
import math

import pytest

import jumpscope
from jumpscope.cli import main
from jumpscope.evaluate.report import frontier, interpolate_at
from jumpscope.activations import ActivationConfig
from jumpscope.jobs.sweep import SweepConfig, run_sweep, sweep_points
from jumpscope.train import TrainerConfig
from tiny_causal_lm import write_corpus, write_tiny_causal_lm

FAST = TrainerConfig(batch_size=256, progress=False, init_sample_tokens=512, log_every=100, checkpoint_every=100)
PNG = b"\x89PNG\r\n\x1a\n"


def point(arch, l0, value):
    return {"arch": arch, "held_out": {"l0": l0, "fvu": value}}


def test_points_map_levels_onto_each_architecture():
    points = sweep_points(SweepConfig(archs=("jumprelu", "topk", "relu"), l0=(8, 16.5), l1_coefficients=(3.0,)))
    assert [(p["name"], p["fields"]) for p in points] == [
        ("jumprelu-target_l0_8", {"target_l0": 8.0}), ("jumprelu-target_l0_16p5", {"target_l0": 16.5}),
        ("topk-k_8", {"k": 8}), ("topk-k_16", {"k": 16}), ("relu-l1_coefficient_3", {"l1_coefficient": 3.0})]


def test_interpolation_is_linear_in_log_l0_and_never_extrapolates():
    group = [point("a", 10.0, 0.5), point("a", 40.0, 0.1)]
    # halfway in log between 10 and 40 is 20
    assert interpolate_at(group, "fvu", 20.0) == pytest.approx(0.3)
    assert interpolate_at(group, "fvu", 10.0 * 40.0 ** 0.25 / 10.0 ** 0.25) == pytest.approx(0.4)
    assert interpolate_at(group, "fvu", 50.0) is None and interpolate_at(group, "fvu", 5.0) is None
    assert interpolate_at(group, "fvu", 41.0) == 0.1  # an end point within 5% of the level
    table = frontier(group + [point("b", 15.0, 0.2), point("b", 30.0, 0.15)], "fvu", [20.0, 35.0])
    expected_b = 0.2 + (math.log(20) - math.log(15)) / (math.log(30) - math.log(15)) * -0.05
    assert table[20.0]["b"] == pytest.approx(expected_b) and table[35.0]["b"] is None


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    activations = ActivationConfig(model=str(write_tiny_causal_lm(root / "model")),
                                   corpus=str(write_corpus(root / "corpus.txt")), txt_split="paragraph",
                                   context_size=32, model_batch_size=4, shuffle_buffer_tokens=1024)
    sweep = SweepConfig(site="layers.1.resid_post", archs=("jumprelu", "topk", "relu"), l0=(2, 6),
                        l1_coefficients=(0.5, 4.0), width=48, tokens=256 * 8, out=str(root / "run"), device="cpu",
                        eval_tokens=512, trainer=FAST)
    points, report = run_sweep(sweep, activations)
    return root / "run", points, report


def test_sweep_writes_every_point_plots_and_report(swept):
    out, points, report = swept
    payload = json.loads((out / "sweep.json").read_text())
    assert [p["name"] for p in payload["points"]] == [p["name"] for p in points]
    assert len(points) == 6 and payload["kind"] == "causal_lm" and payload["main_measure"] == "delta_lm_loss"
    for p in points:
        held = p["held_out"]
        assert held["n_tokens"] == points[0]["held_out"]["n_tokens"]  # the same held-out text for all
        assert {"l0", "fvu", "delta_lm_loss", "kl_div", "ce_loss_recovered", "dense_fraction"} <= set(held)
        sae = jumpscope.load(out / p["name"])
        assert sae.architecture == p["arch"] and sae.cfg.d_sae == 48
    by_name = {p["name"]: p["held_out"] for p in points}
    assert by_name["topk-k_2"]["l0"] == pytest.approx(2.0) and by_name["topk-k_6"]["l0"] == pytest.approx(6.0)
    for png in ("l0_vs_delta_loss.png", "l0_vs_fvu.png", "l0_vs_ce_recovered.png", "feature_density.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, png
        assert f"]({png})" in report
    assert report == (out / "report.md").read_text()
    assert "| topk-k_6 | k = 6 |" in report and "at matched L0" in report


@pytest.mark.parametrize("argv,message", [
    (["--archs", "jumprelu", "mystery"], "unknown archs ['mystery']"),
    (["--archs", "relu", "--sae-k-aux", "4"], "--sae-k-aux not a field of 'relu'"),
    (["--l0", "0"], "l0 levels must be positive"),
])
def test_bad_sweep_options_are_clear_errors(tmp_path, capsys, argv, message):
    assert main(["sweep", "--out", str(tmp_path / "x"), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
