"""The Jacobian SAE pair: one module, two TopK SAEs, trained with a penalty on their Jacobian."""

import pytest
import torch

import jumpscope
from jumpscope.jacobian import JacobianSAE, JacobianSAEConfig, jacobian_active, mlp_function
from jumpscope.models.harvest import Harvester
from jumpscope.sae import StepContext
from jumpscope.train import Trainer, TrainerConfig
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


def test_the_pair_jacobian_is_the_core_jacobian_and_the_loss_has_every_term():
    model, x, y = pair_data()
    pair = make_pair(model)
    ctx = StepContext(input_scale=2.0, output_scale=0.5)
    J = pair.jacobian(x[:16] / 2.0, ctx)[0]
    latents = pair.encode(x[:16] / 2.0)
    x_raw = pair.decode(latents) * 2.0
    y_scaled = pair.mlp(x_raw) / 0.5
    reference = jacobian_active(pair.mlp, pair.W_dec, x_raw, latents.topk(4, dim=-1).indices, pair.output.W_enc,
                                pair.output.pre_activation(y_scaled).topk(4, dim=-1).indices, 2.0, 0.5)
    torch.testing.assert_close(J, reference)
    out = pair.loss(x[:16] / 2.0, ctx, y[:16] / 0.5)
    assert {"mse_in", "mse", "jacobian"} <= set(out.terms) and out.terms["jacobian"] > 0
    out.loss.backward()
    assert pair.W_dec.grad.abs().sum() > 0 and pair.output.W_enc.grad.abs().sum() > 0


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
    pairs = json.loads((tmp_path / "run" / "summary.json").read_text())["pairs"]
    assert set(pairs) == {"lambda_0", "lambda_50"}
    for row in pairs.values():
        fractions = row["jacobian"]
        assert list(fractions) == ["jacobian_above_0.005", "jacobian_above_0.01", "jacobian_above_0.02"]
        assert 1 >= fractions["jacobian_above_0.005"] >= fractions["jacobian_above_0.01"] >= fractions[
            "jacobian_above_0.02"] >= 0
        assert row["held_out"]["input"]["site"] == "layers.1.mlp_in" and "delta_lm_loss" in row["held_out"]["output"]
        shapes = row["strongest_functions"]
        assert len(shapes) == 8 and {s["shape"] for s in shapes} <= {"linear", "jumprelu-like", "other"}
        assert all(abs(s["jacobian"]) >= abs(shapes[-1]["jacobian"]) for s in shapes)  # strongest first
    assert jumpscope.load(tmp_path / "run" / "lambda_50" / "output").cfg.site == "layers.1.mlp_out"
    assert (tmp_path / "run" / "lambda_sweep.png").read_bytes().startswith(b"\x89PNG")
    assert "| lambda | |J| > 0.005 |" in capsys.readouterr().out
    assert main(["jsae", *common, "--randomize-model", "--out", str(tmp_path / "control")]) == 0
    control = json.loads((tmp_path / "control" / "summary.json").read_text())
    assert control["job"]["randomize_model"] and control["pairs"]["lambda_1"]["jacobian"] != pairs["lambda_0"]["jacobian"]
    assert main(["jsae", *common[:-7], "--layer", "9", "--out", str(tmp_path / "x")]) == 2
    assert "layer 9 out of range" in capsys.readouterr().err


def test_the_pair_is_not_an_ordinary_architecture_for_train_sweep_or_suite(tmp_path, capsys):
    from jumpscope.cli import main

    assert main(["train", "--arch", "jsae", "--out", str(tmp_path / "t")]) == 2
    assert "jumpscope jsae" in capsys.readouterr().err
    assert main(["sweep", "--archs", "jsae", "--out", str(tmp_path / "s")]) == 2
    assert "jumpscope jsae" in capsys.readouterr().err


def test_randomize_weights_keeps_each_matrix_scale_and_no_structure():
    from jumpscope.jobs.jsae import randomize_weights

    model, _ = build_model("gpt2")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    randomize_weights(model, seed=3)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            assert not torch.equal(p, before[name]), name
            assert p.std().item() == pytest.approx(before[name].std().item(), rel=0.1), name
        else:
            assert torch.equal(p, before[name]), name  # norms and biases kept
