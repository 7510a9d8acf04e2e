"""`jumpscope dashboard` end to end: a tiny causal LM (with logit lens) and the real MiniLM encoder."""

import json

import pytest
import torch

import jumpscope
from jumpscope.analysis import LatentExamples, LogitLens, logit_lens
from jumpscope.cli import main
from jumpscope.activations import ActivationConfig, ActivationSource
from jumpscope.models.harvest import Harvester, unpack_batch
from jumpscope.models.loading import load_model
from jumpscope.sae import build
from tiny_causal_lm import write_corpus, write_tiny_causal_lm

SITE = "layers.1.resid_post"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    model_path = write_tiny_causal_lm(root / "model")
    corpus = write_corpus(root / "corpus.txt")
    loaded = load_model(str(model_path))
    d = loaded.model.config.hidden_size
    sae = build("relu", d_in=d, d_sae=48, site=SITE, model=str(model_path))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random directions with thresholds so latents fire at different rates
        sae.W_enc.copy_(torch.randn(d, 48, generator=g))
        sae.b_enc.copy_(-torch.linspace(0.0, 3.0, 48))
    jumpscope.save(sae, root / "sae", format="native")
    return root, corpus, loaded, sae


def dashboard_cli(root, corpus, *args):
    return main(["dashboard", str(root / "sae"), "--corpus", str(corpus), "--txt-split", "paragraph",
                 "--context-size", "32", "--model-batch-size", "4", "--n-top", "5", "--n-sample", "3", *args])


def test_dashboard_of_a_causal_lm(setup, capsys):
    root, corpus, loaded, sae = setup
    out = root / "site"
    assert dashboard_cli(root, corpus, "--tokens", "1500", "--out", str(out), "--device", "cpu") == 0
    assert "open" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert 1500 <= summary["n_tokens"] < 1500 + 4 * 32
    assert (out / "index.html").is_file()
    assert all((out / "latents" / f"{i}.html").is_file() for i in range(48))
    examples = LatentExamples.load(out / "examples")
    # the best examples against a brute-force pass over the same windows the job read
    source = ActivationSource(ActivationConfig(model=sae.cfg.model, corpus=str(corpus), txt_split="paragraph",
                                               context_size=32, model_batch_size=4), [SITE], loaded=loaded)
    peaks, seen = [], 0
    for batch in source.windows(split="all"):
        if seen >= summary["n_tokens"]:
            break
        ids, mask, _ = unpack_batch(batch)
        with torch.no_grad():
            latents = sae.encode(Harvester(loaded.model, [SITE]).activations(ids)[SITE])
        peaks.append(latents.masked_fill(~mask[..., None], 0).amax(dim=1))
        seen += int(mask.sum())
    assert seen == summary["n_tokens"]
    best = torch.cat(peaks).sort(dim=0, descending=True).values[:5].T  # [d_sae, 5]
    torch.testing.assert_close(examples.top_values, best.clamp(min=0), rtol=1e-5, atol=1e-5)
    assert (examples.top_values[:, 0] >= examples.top_values[:, -1]).all()
    lens = LogitLens.load(out / "logit_lens.safetensors")
    assert torch.equal(lens.promoted_ids, logit_lens(sae, loaded.model, 10).promoted_ids)


def test_dashboard_of_the_minilm_encoder_has_no_logit_lens(tmp_path):
    sae = build("topk", d_in=384, d_sae=64, k=4, site="layers.2.resid_post", model="minilm")
    jumpscope.save(sae, tmp_path / "sae", format="native")
    out = tmp_path / "site"
    assert main(["dashboard", str(tmp_path / "sae"), "--tokens", "600", "--out", str(out), "--n-top", "3",
                 "--n-sample", "2", "--context-size", "64", "--device", "cpu"]) == 0
    assert not (out / "logit_lens.safetensors").exists()
    examples = LatentExamples.load(out / "examples")
    assert examples.n_tokens >= 600 and int(examples.fire_count.sum()) == 4 * examples.n_tokens  # TopK: k each


def test_dashboard_bad_inputs(setup, tmp_path, capsys):
    root, corpus, loaded, sae = setup
    assert main(["dashboard", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) != 0
    assert "no SAE at" in capsys.readouterr().err
    transcoder = build("relu", d_in=sae.cfg.d_in, d_sae=8, site="layers.1.mlp_in", target_site="layers.1.mlp_out",
                       apply_b_dec_to_input=False, model=sae.cfg.model)
    jumpscope.save(transcoder, tmp_path / "tc", format="native")
    assert main(["dashboard", str(tmp_path / "tc"), "--corpus", str(corpus), "--out", str(tmp_path / "o")]) != 0
    assert "is a transcoder" in capsys.readouterr().err
    assert dashboard_cli(root, corpus, "--tokens", "0", "--out", str(tmp_path / "o")) == 2
    assert "tokens must be positive" in capsys.readouterr().err


def test_token_strings_read_like_text(setup):
    """Display strings: WordPiece words get their space back, sentencepiece's marker is a space,
    byte-fallback pieces are their character."""
    from jumpscope.analysis import token_strings

    root, corpus, loaded, sae = setup
    llama = token_strings(loaded.tokenizer)
    pieces = loaded.tokenizer.convert_ids_to_tokens(list(range(len(loaded.tokenizer))))
    assert llama[pieces.index("<0x0A>")] == "\n"
    assert all(text == piece.replace("▁", " ") for text, piece in zip(llama, pieces) if "▁" in piece)
    minilm = load_model("minilm").tokenizer
    words = token_strings(minilm)
    ids = minilm("sparsified autoencoders happened")["input_ids"][1:-1]
    assert any(piece.startswith("##") for piece in minilm.convert_ids_to_tokens(ids))  # continuations covered
    assert "".join(words[i] for i in ids) == " " + " ".join(minilm.decode(ids).split())


def test_dashboard_scans_the_corpus_the_sae_was_trained_on(setup, capsys):
    from jumpscope.jobs.dashboard import DashboardJobConfig, corpus_spec, run_dashboard

    root, corpus, loaded, sae = setup
    run = root / "run"
    jumpscope.save(sae, run / SITE, format="native")
    recorded = f"files:{corpus.absolute()} (paragraphs)"  # as ActivationSource.manifest names it
    (run / "summary.json").write_text(json.dumps({"source": {"corpus": recorded}}))
    small = ActivationConfig(context_size=32, model_batch_size=4)
    job = DashboardJobConfig(sae=str(run / SITE), tokens=300, out=str(root / "site_recorded"), device="cpu",
                             progress=False)
    summary = run_dashboard(job, small, corpus_given=False)
    assert summary["source"]["corpus"] == recorded
    assert "training corpus" in capsys.readouterr().err
    # the layer of the SAE goes to the pages for the logit-lens note
    assert LatentExamples.load(root / "site_recorded" / "examples").meta["layer"] == 1
    # --corpus given wins; an SAE with no record falls back to the built-in corpus, with a note
    assert run_dashboard(job, small, corpus_given=True)["source"]["corpus"].startswith("builtin:")
    no_record = DashboardJobConfig(sae=str(root / "sae"), tokens=100, out=str(root / "site_builtin"), device="cpu",
                                   progress=False)
    assert run_dashboard(no_record, small, corpus_given=False)["source"]["corpus"].startswith("builtin:")
    assert "records no training corpus" in capsys.readouterr().err
    assert corpus_spec("builtin:python-3.11.7") == ("builtin", "file")
    assert corpus_spec("files:/a/b.txt,hf:wikitext:wikitext-2-raw-v1:train (lines)") == (
        "/a/b.txt,hf:wikitext:wikitext-2-raw-v1:train", "line")
