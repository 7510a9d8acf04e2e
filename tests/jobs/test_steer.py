"""The steer job and command: parsing interventions, side-by-side output, errors, and its config."""

import pytest

from jumpscope import formats
from jumpscope.cli import main
from jumpscope.jobs.steer import parse_interventions
from jumpscope.models.loading import load_model
from jumpscope.sae import build as build_sae
from jumpscope.steer import Ablate, Clamp, Steer, display_text, generate_with, side_by_side
from tiny_causal_lm import write_tiny_causal_lm

D = 32  # hidden width of the tiny models
SITE = "layers.1.resid_post"


def topk_sae(seed=0, d_sae=64, k=8, **fields):
    return build_sae("topk", d_in=D, d_sae=d_sae, k=k, seed=seed, **fields).eval()


def test_parse_interventions_and_side_by_side():
    edits = parse_interventions(steer=("12:8", "3:-2.5"), clamp=("4:1",), ablate=("5,6", "7"))
    assert edits == [Ablate((5, 6)), Ablate((7,)), Clamp(4, 1.0), Steer(12, 8.0), Steer(3, -2.5)]
    for bad, match in [(dict(steer=("12",)), "LATENT:ALPHA"), (dict(steer=("a:1",)), "integer latent"),
                       (dict(clamp=("1:x",)), "LATENT:VALUE"), (dict(ablate=(",",)), "LATENT")]:
        with pytest.raises(ValueError, match=match):
            parse_interventions(**bad)
    text = side_by_side([("left", "one two three " * 5), ("right", "x\x07y\nz")], width=41)
    lines = text.splitlines()
    assert lines[0].startswith("left") and "| right" in lines[0] and set(lines[1]) <= {"-", "+"}
    assert display_text("x\x07y\nz") == "x\\x07y z" and "x\\x07y z" in text


def columns(output, width):
    """The two columns' texts of a side_by_side block starting after its rule line."""
    column = (width - 3) // 2
    lines = output.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) <= {"-", "+"})
    body = []
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        body.append(line)
    left = "".join(line[:column] for line in body)
    right = "".join(line[column + 3:] for line in body)
    return "".join(left.split()), "".join(right.split())


def test_cli_steer_prints_both_generations(tmp_path, capsys):
    model_path = write_tiny_causal_lm(tmp_path / "model")
    sae = build_sae("topk", d_in=D, d_sae=64, k=8, model=str(model_path), site=SITE)
    formats.save(sae, tmp_path / "sae", format="native")
    args = ["steer", str(tmp_path / "sae"), "--prompt", "hello abc", "--steer", "3:60", "--ablate", "1,2",
            "--max-new-tokens", "12", "--width", "80", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "unsteered" in out and "steered" in out and "ablate 1, 2; steer 3 by +60" in out
    loaded = load_model(model_path)
    plain = generate_with(loaded, None, "hello abc", max_new_tokens=12)
    steered = generate_with(loaded, None, "hello abc", {SITE: (formats.load(tmp_path / "sae"),
                                                               [Ablate((1, 2)), Steer(3, 60.0)])}, max_new_tokens=12)
    assert plain != steered
    expect = tuple("".join(display_text(text).split()) for text in (plain, steered))
    assert columns(out, 80) == expect


def test_cli_steer_errors(tmp_path, capsys):
    model_path = write_tiny_causal_lm(tmp_path / "model")
    formats.save(build_sae("topk", d_in=D, d_sae=64, k=8, site=SITE), tmp_path / "nomodel", format="native")
    formats.save(build_sae("topk", d_in=D, d_sae=64, k=8, model=str(model_path), site=SITE), tmp_path / "sae",
                 format="native")
    sae = str(tmp_path / "sae")
    for args, message in [([sae, "--prompt", "hi"], "at least one intervention"),
                          ([sae, "--prompt", "hi", "--steer", "3"], "LATENT:ALPHA"),
                          ([sae, "--steer", "3:1"], "at least one prompt"),
                          ([sae, "--prompt", "hi", "--clamp", "3:-1"], ">= 0"),
                          ([sae, "--prompt", "hi", "--steer", "64:1", "--device", "cpu"], "out of range"),
                          ([str(tmp_path / "nomodel"), "--prompt", "hi", "--steer", "1:1"], "--model")]:
        assert main(["steer", *args]) == 2, args
        assert message in capsys.readouterr().err, args


def test_every_steer_job_field_has_a_docstring():
    import dataclasses

    from jumpscope.cli.dataclass_args import field_docs
    from jumpscope.jobs.steer import SteerJobConfig

    docs = field_docs(SteerJobConfig)
    assert not [f.name for f in dataclasses.fields(SteerJobConfig) if not docs.get(f.name, "").strip()]
