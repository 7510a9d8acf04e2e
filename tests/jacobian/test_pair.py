"""The Jacobian SAE pair: one module, two TopK SAEs, trained with a penalty on their Jacobian."""

import pytest
import torch

import jumpscope
from jumpscope.jacobian import JacobianSAE, JacobianSAEConfig, mlp_function
from jumpscope.models.harvest import Harvester
from jumpscope.sae import StepContext
from jumpscope.train import Trainer, TrainerConfig
from jacobian_reference import autograd_jacobian
from tiny_models import build as build_model

LAYER = 1


def pair_data(name="gpt2", n_batches=12, batch=128, seed=0):
    model, _ = build_model(name)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (n_batches * batch // 12, 12), generator=g)
    acts = Harvester(model, [f"layers.{LAYER}.mlp_in", f"layers.{LAYER}.mlp_out"]).activations(ids)
    x = acts[f"layers.{LAYER}.mlp_in"].reshape(-1, 32)
    y = acts[f"layers.{LAYER}.mlp_out"].reshape(-1, 32)
    return model, x, y


def make_pair(model, **fields):
    cfg = JacobianSAEConfig(d_in=32, d_sae=64, k=4, site=f"layers.{LAYER}.mlp_in", output_site=f"layers.{LAYER}.mlp_out",
                            **fields)
    return JacobianSAE(cfg).attach_mlp(mlp_function(model, LAYER))


@pytest.mark.parametrize("point", ["input", "reconstruction"])
def test_the_pair_jacobian_at_either_point_is_the_autograd_jacobian(point):
    model, x, y = pair_data()
    pair = make_pair(model)
    ctx = StepContext(input_scale=2.0, output_scale=0.5)
    J = pair.jacobian(x[:16] / 2.0, ctx, point=point)[0]
    torch.testing.assert_close(J, autograd_jacobian(pair, x[:16], point, 2.0, 0.5), rtol=1e-4, atol=1e-6)
    assert make_pair(model, jacobian_point=point).cfg.jacobian_point == point


def test_at_the_true_input_the_penalty_reaches_only_the_references_parameters():
    """The reference's J (weights gathered at the true input) trains the input SAE's decoder and the
    output SAE's encoder; at the reconstruction the penalty also reaches the input encoder."""
    model, x, y = pair_data()
    reached = {}
    for point in ("input", "reconstruction"):
        pair = make_pair(model, jacobian_point=point, jacobian_coefficient=1.0)
        pair.loss(x[:32], StepContext(), y[:32]).terms["jacobian"].backward()
        reached[point] = {name for name, p in pair.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached["input"] == {"W_dec", "output.W_enc"}
    assert {"W_enc", "b_enc", "W_dec", "output.W_enc"} <= reached["reconstruction"]


def test_the_loss_has_every_term_and_the_paper_preset_is_the_references_pair():
    model, x, y = pair_data()
    pair = make_pair(model)
    out = pair.loss(x[:16], StepContext(), y[:16])
    assert {"mse_in", "mse", "jacobian", "aux_in", "aux_out"} <= set(out.terms) and out.terms["jacobian"] > 0
    torch.testing.assert_close(out.loss, sum(out.terms.values()))
    assert pair.cfg.jacobian_coefficient == 0.5 * 4 * 4 / 32  # the authors' 0.5 k^2 / d_model
    paper = JacobianSAE(JacobianSAEConfig.preset("paper", d_in=32, d_sae=64, k=4, site=f"layers.{LAYER}.mlp_in",
                                                 output_site=f"layers.{LAYER}.mlp_out")).attach_mlp(pair.mlp)
    cfg = paper.cfg
    assert (cfg.input_scaling, cfg.aux_coefficient, cfg.apply_b_dec_to_input, cfg.optimizer, cfg.lr) == \
        ("none", 0.0, False, "adam", 5e-4)
    for sae in (paper, paper.output):  # encoder = decoder^T at init, b_dec not subtracted
        assert torch.equal(sae.W_enc, sae.W_dec.T)
        torch.testing.assert_close(sae.pre_activation(x[:4]), x[:4] @ sae.W_enc + sae.b_enc)
    out = paper.loss(x[:16], StepContext(), y[:16])
    reconstruction = paper.decode(paper.encode(x[:16]))
    torch.testing.assert_close(out.terms["mse_in"], torch.nn.functional.mse_loss(reconstruction, x[:16]))
    torch.testing.assert_close(out.terms["mse"], torch.nn.functional.mse_loss(out.reconstruction, y[:16]))
    assert float(out.terms["aux_in"]) == 0.0


def train_pair(model, x, y, coefficient):
    pair = make_pair(model, jacobian_coefficient=coefficient, lr=3e-3, lr_warmup_steps=5)
    batches = [{"in": x[i:i + 128], "out": y[i:i + 128]} for _ in range(4) for i in range(0, len(x) - 127, 128)]
    Trainer({"pair": pair}, TrainerConfig(batch_size=128, total_tokens=128 * len(batches), progress=False,
                                          init_sample_tokens=256), inputs={"pair": ("in", "out")}).fit(batches)
    return pair


def test_the_penalty_makes_the_jacobian_sparser_and_split_gives_two_topk_saes(tmp_path):
    model, x, y = pair_data()
    # a random tiny MLP has small weights (|J| ~ 1e-3), so lambda must be large for the penalty to matter
    plain, sparse = train_pair(model, x, y, 0.0), train_pair(model, x, y, 300.0)
    ctx = StepContext()  # folded: raw units
    mean_abs = {name: pair.jacobian(x, ctx)[0].abs().mean().item() for name, pair in
                (("plain", plain), ("sparse", sparse))}
    assert mean_abs["sparse"] < 0.7 * mean_abs["plain"]
    inner, outer = sparse.split()
    assert (inner.cfg.site, outer.cfg.site) == (f"layers.{LAYER}.mlp_in", f"layers.{LAYER}.mlp_out")
    assert torch.equal(inner.encode(x), sparse.encode(x)) and torch.equal(outer.encode(y), sparse.output.encode(y))
    sparse.save(tmp_path / "pair")
    loaded = jumpscope.load(tmp_path / "pair")
    assert isinstance(loaded, JacobianSAE) and torch.equal(loaded.output.encode(y), sparse.output.encode(y))


def test_bad_pairs_are_clear_errors():
    model, x, y = pair_data()
    with pytest.raises(ValueError, match="leave d_out and target_site unset"):
        JacobianSAE(JacobianSAEConfig(d_in=32, d_sae=64, d_out=16, apply_b_dec_to_input=False))
    with pytest.raises(RuntimeError, match="no MLP attached"):
        JacobianSAE(JacobianSAEConfig(d_in=32, d_sae=64, k=4)).jacobian(x[:4], StepContext())
    with pytest.raises(ValueError, match="route a target"):
        make_pair(model).loss(x[:4], StepContext())


def test_jsae_command_trains_measures_and_writes_the_two_saes(tmp_path, capsys):
    import json

    from jumpscope.cli import main
    from tiny_causal_lm import write_corpus, write_tiny_causal_lm

    model, corpus = write_tiny_causal_lm(tmp_path / "model"), write_corpus(tmp_path / "corpus.txt")
    common = ["--model", str(model), "--corpus", str(corpus), "--txt-split", "paragraph", "--context-size", "32",
              "--model-batch-size", "4", "--layer", "1", "--k", "4", "--width", "48", "--tokens", str(256 * 6),
              "--batch-size", "256", "--init-sample-tokens", "512", "--no-progress", "--eval-tokens", "256",
              "--device", "cpu"]
    assert main(["jsae", *common, "--jacobian-coefficients", "0", "50", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    pairs = summary["pairs"]
    assert set(pairs) == {"lambda_0", "lambda_50"} and summary["units"] == "raw"
    for row in pairs.values():
        measures = row["jacobian"]
        assert measures["out_in_scale_ratio"] > 0
        for point in ("at_input", "at_reconstruction"):
            at = measures[point]
            assert 1 >= at["above_0.005"] >= at["above_0.01"] >= at["above_0.015"] >= at["above_0.02"] >= 0
            assert at["mean_abs"] > 0
        assert row["held_out"]["input"]["site"] == "layers.1.mlp_in" and "delta_lm_loss" in row["held_out"]["output"]
        shapes = row["strongest_functions"]
        assert len(shapes) == 8 and {s["shape"] for s in shapes} <= {"linear", "jumprelu-like", "other"}
        assert all(abs(s["jacobian"]) >= abs(shapes[-1]["jacobian"]) for s in shapes)  # strongest first
    assert pairs["lambda_50"]["jacobian"]["at_input"]["mean_abs"] < pairs["lambda_0"]["jacobian"]["at_input"]["mean_abs"]
    saved = jumpscope.load(tmp_path / "run" / "lambda_50" / "output")
    assert saved.cfg.site == "layers.1.mlp_out" and saved.cfg.aux_coefficient == 0.0  # the paper recipe
    assert (tmp_path / "run" / "lambda_sweep.png").read_bytes().startswith(b"\x89PNG")
    assert "| model | lambda | out/in scale |" in capsys.readouterr().out

    # trained and both controls in one run: a folder each, one trade-off plot
    assert main(["jsae", *common, "--controls", "none", "init", "redraw", "--recipe", "normalised",
                 "--out", str(tmp_path / "controls")]) == 0
    both = json.loads((tmp_path / "controls" / "summary.json").read_text())
    assert list(both["controls"]) == ["none", "init", "redraw"] and both["units"] == "normalised"
    lam = f"lambda_{0.5 * 4 * 4 / 32:g}"  # the default: 0.5 k^2 / d_model
    ratios = {c: both["controls"][c]["pairs"][lam]["jacobian"]["out_in_scale_ratio"] for c in both["controls"]}
    assert len(set(ratios.values())) == 3  # three different models
    for control in ("none", "init", "redraw"):
        assert (tmp_path / "controls" / control / lam / "input" / "cfg.json").exists()
    assert (tmp_path / "controls" / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()

    assert main(["jsae", *common[:-7], "--layer", "9", "--out", str(tmp_path / "x")]) == 2
    assert "layer 9 out of range" in capsys.readouterr().err
    assert main(["jsae", *common, "--controls", "none", "none", "--out", str(tmp_path / "y")]) == 2
    assert "repeat" in capsys.readouterr().err
    assert main(["jsae", *common, "--cache", str(tmp_path / "cache"), "--controls", "init",
                 "--out", str(tmp_path / "z")]) == 2
    assert "activation cache holds the trained model" in capsys.readouterr().err


def test_the_pair_is_not_an_ordinary_architecture_for_train_sweep_or_suite(tmp_path, capsys):
    from jumpscope.cli import main

    assert main(["train", "--arch", "jsae", "--out", str(tmp_path / "t")]) == 2
    assert "jumpscope jsae" in capsys.readouterr().err
    assert main(["sweep", "--archs", "jsae", "--out", str(tmp_path / "s")]) == 2
    assert "jumpscope jsae" in capsys.readouterr().err


def test_the_attached_mlp_moves_with_the_pair():
    # the trainer moves the pair with .to(device) after the job attached the MLP on the CPU: the MLP
    # must follow (it crashed at the reconstruction point on a GPU, and was copied over every step)
    model, _, _ = pair_data()
    pair = make_pair(model).to("meta")  # a second device any machine has
    tensors = [value for value in vars(pair.mlp).values() if torch.is_tensor(value)]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert pair.W_enc.device.type == "meta"


@pytest.mark.cuda
@pytest.mark.parametrize("point", ["input", "reconstruction"])
def test_on_the_gpu_a_training_step_and_the_measures_match_the_cpu(point):
    from jumpscope.jacobian.jacobian import classify_response, latent_response

    model, x, y = pair_data()
    cpu = make_pair(model, jacobian_point=point, jacobian_coefficient=1.0)
    gpu = make_pair(model, jacobian_point=point, jacobian_coefficient=1.0).to("cuda")  # attached on the CPU, moved
    ctx = StepContext()
    losses = [pair.loss(x[:32].to(device), ctx, y[:32].to(device)).loss.item() for pair, device in
              ((cpu, "cpu"), (gpu, "cuda"))]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    values = torch.linspace(0.0, 2.0, 9)  # on the CPU, as the jsae job sweeps them
    curves = [latent_response(pair.mlp, pair.W_dec, pair.output.W_enc, x[0].to(device), 0, 1, values,
                              out_bias=pair.output.b_enc) for pair, device in ((cpu, "cpu"), (gpu, "cuda"))]
    torch.testing.assert_close(curves[1].cpu(), curves[0], rtol=1e-4, atol=1e-6)
    flat = torch.zeros(9, device="cuda")  # a rank-deficient design: CUDA's least squares cannot solve it
    assert classify_response(flat, curves[1]) == classify_response(torch.zeros(9), curves[0])
