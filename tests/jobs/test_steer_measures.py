"""``jumpscope steer`` measures: JSON with every condition, concept words given or from the logit
lens, the random control, and ablating the latents ``jumpscope find`` returns."""

import json

import pytest
import torch

from jumpscope import formats
from jumpscope.cli import main
from jumpscope.models.loading import load_model
from jumpscope.sae import build as build_sae
from jumpscope.steer import continuation_loss
from jumpscope.jobs.steer_measures import lens_words
from llama2c_files import make_weights, write_checkpoint, write_tokenizer
from planted_concepts import texts, token_detector
from tiny_causal_lm import CFG, VOCAB, write_tiny_causal_lm

SITE = "layers.1.resid_post"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer_measures")
    model_path = write_tiny_causal_lm(root / "model")
    formats.save(build_sae("topk", d_in=32, d_sae=64, k=8, model=str(model_path), site=SITE), root / "sae",
                 format="native")
    return root, model_path


def steer_json(capsys, *args):
    assert main(["steer", *args, "--json", "--device", "cpu", "--max-new-tokens", "8"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_has_the_measures_of_every_condition(setup, capsys):
    root, model_path = setup
    (root / "prompts.txt").write_text("bell ace\n\n  hello abc \n")
    out = steer_json(capsys, str(root / "sae"), "--prompt", "aa lo", "--prompts", str(root / "prompts.txt"),
                     "--steer", "3:30", "--control", "random", "--concept-words", "hello,ABC", "--samples", "2",
                     "--temperature", "1")
    assert out["prompts"] == ["aa lo", "bell ace", "hello abc"]
    assert out["concept_words"] == ["hello", "ABC"] and "given" in out["concept_source"]
    assert set(out["conditions"]) == {"unsteered", "steered", "control"}
    assert "random control of 3" in out["conditions"]["control"]["description"]
    for name, result in out["conditions"].items():
        assert result["concept"]["texts"] == 6 and len(result["generations"]) == 6
        assert 0 <= result["concept"]["fraction"] <= 1 and 0 < result["concept"]["tokens"] <= 48  # EOS may end one early
        assert result["fluency_cost"] == pytest.approx(result["loss"] - out["conditions"]["unsteered"]["loss"])
    assert out["conditions"]["unsteered"]["fluency_cost"] == 0
    assert out["conditions"]["steered"]["generations"][0]["text"] != \
        out["conditions"]["control"]["generations"][0]["text"] or out["conditions"]["steered"]["loss"] != \
        out["conditions"]["control"]["loss"]
    # a generation's loss is its continuation's NLL under the plain model
    loaded = load_model(model_path)
    plain = out["conditions"]["steered"]["generations"][1]
    prompt = loaded.tokenizer.encode("aa lo")
    assert plain["seed"] == 1 and plain["prompt"] == 0
    assert out["decoder_norms"]["3"] == pytest.approx(1.0, rel=1e-4)  # TopK decoders are unit norm
    text = main(["steer", str(root / "sae"), "--prompt", "aa lo", "--steer", "3:30", "--control", "random",
                 "--device", "cpu", "--max-new-tokens", "4", "--concept-words", "hello"])
    report = capsys.readouterr().out
    assert text == 0 and "| control |" in report and "fluency cost" in report and prompt


def test_default_concept_words_come_from_the_logit_lens(setup, capsys):
    root, model_path = setup
    out = steer_json(capsys, str(root / "sae"), "--prompt", "aa lo", "--steer", "5:20", "--lens-top", "30")
    loaded = load_model(model_path)
    expected = lens_words(formats.load(root / "sae"), loaded, 5, n=30)
    assert out["concept_words"] == expected and expected and "logit lens of latent 5" in out["concept_source"]
    assert set(out["conditions"]) == {"unsteered", "steered"}


def hello_model(folder):
    """A tiny untied model that, once it reads ' hello', keeps writing it: the token's embedding is
    scaled up so it dominates the residual stream, and its unembedding row points along it."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / f"tok{VOCAB}.bin")
    w = make_weights(CFG, tied=False, seed=0)
    write_checkpoint(folder / "model.bin", CFG, w, tied=False)
    hello = load_model(str(folder / "model.bin")).tokenizer.convert_tokens_to_ids("\u2581hello")
    w["emb"][hello] *= 6
    w["cls"][hello] = 2 * w["emb"][hello] / (w["emb"][hello] ** 2).sum() ** 0.5
    write_checkpoint(folder / "model.bin", CFG, w, tied=False)
    return folder / "model.bin", hello


def test_ablating_the_found_latent_lowers_its_token_rate(tmp_path, capsys):
    model_path, hello = hello_model(tmp_path / "model")
    loaded = load_model(str(model_path))
    sae = token_detector(loaded, [hello], slots=(3,), d_sae=12)
    with torch.no_grad():  # ablating the detector removes the whole ' hello' embedding, not half of it
        embedding = loaded.model.get_input_embeddings().weight[hello]
        direction = sae.W_enc[:, 3].clone()
        value = float(embedding @ direction + sae.b_enc[3])
        sae.W_dec[3] = direction * float(embedding @ direction) / value
    formats.save(sae, tmp_path / "sae", format="native")
    (tmp_path / "pos.txt").write_text("\n".join(texts(10, True, seed=1, max_words=12)))
    (tmp_path / "neg.txt").write_text("\n".join(texts(10, False, seed=2, max_words=12)))
    assert main(["find", str(tmp_path / "sae"), "--model", str(model_path), "--device", "cpu", "--positive",
                 str(tmp_path / "pos.txt"), "--negative", str(tmp_path / "neg.txt"), "--out",
                 str(tmp_path / "found.json")]) == 0
    capsys.readouterr()
    out = steer_json(capsys, str(tmp_path / "sae"), "--model", str(model_path), "--prompt", "abc hello",
                     "--prompt", "bell aa hello", "--found", str(tmp_path / "found.json"), "--ablate-found", "1")
    assert out["interventions"] == "ablate 3"
    assert out["concept_words"] == ["hello"] and "examples of latents 3" in out["concept_source"]
    before, after = (out["conditions"][name]["concept"] for name in ("unsteered", "steered"))
    assert before["fraction"] == 1 and before["hits"] >= 8  # the model repeats ' hello'
    assert after["hits"] < before["hits"] / 4
    plain = out["conditions"]["unsteered"]["generations"][0]
    ids = loaded.tokenizer.encode("abc hello")
    new = loaded.tokenizer.encode(plain["text"])[1:]  # repeated ' hello' tokenises back the same
    if len(new) == plain["tokens"]:
        assert plain["loss"] == pytest.approx(continuation_loss(loaded, None, ids, new), rel=1e-4)


def test_measure_option_errors(setup, capsys):
    root, _ = setup
    sae = str(root / "sae")
    for args, message in [(["--prompt", "hi", "--steer", "1:1", "--samples", "2"], "temperature > 0"),
                          (["--prompt", "hi", "--ablate", "1", "--control", "random"], "--steer"),
                          (["--prompt", "hi", "--ablate-found", "2"], "go together"),
                          (["--steer", "1:1"], "at least one prompt")]:
        assert main(["steer", sae, *args]) == 2, args
        assert message in capsys.readouterr().err, args
