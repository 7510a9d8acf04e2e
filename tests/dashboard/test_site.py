"""The static dashboard: its files, its data round-tripping, escaping of hostile token text, errors,
and ``jumpscope serve``. The real-browser checks are in test_dashboard_browser.py."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from jumpscope.analysis.records import PAD_TOKEN, LatentExamples, LogitLens
from jumpscope.cli import main
from jumpscope.dashboard import write_dashboard
from jumpscope.dashboard.payload import frequent_peak_tokens, round_significant

HOSTILE = "<img src=x onerror=alert(1)>"
VOCAB = [HOSTILE, "</script>", "\"quotes'&amp;", "\n", " the", " cat", "Dog", " sat", "caf\u00e9", "a\u2028b"] + [
    f"w{i}" for i in range(10, 24)]
CAT = 5
WORDS = list(range(10, 24))  # ordinary tokens: none contains "cat"
D_SAE, N_TOP, N_SAMPLE, WIDTH, PEAK, N_TOKENS = 40, 5, 4, 8, 3, 10_000
DEAD = (0, 1, 2, 3)
DENSE = 5
HOSTILE_LATENT = 7
CAT_LATENTS = (10, 11, 12, 20)  # 10-12 peak on " cat"; the logit lens of 20 promotes it
SHARD_SIZE = 16


def _windows(generator: torch.Generator, slots: int, used: torch.Tensor, peaks: torch.Tensor):
    values = (torch.rand(D_SAE, slots, generator=generator) * 9 + 0.5).sort(1, descending=True).values
    slot_used = torch.arange(slots)[None, :] < used[:, None]
    values = torch.where(slot_used, values, torch.zeros_like(values))
    tokens = torch.tensor(WORDS)[torch.randint(0, len(WORDS), (D_SAE, slots, WIDTH), generator=generator)]
    tokens[:, :, PEAK] = peaks
    tokens[:, :, 0] = torch.where(torch.rand(D_SAE, slots, generator=generator) < 0.3, PAD_TOKEN, tokens[:, :, 0])
    neighbours = (torch.rand(D_SAE, slots, WIDTH, generator=generator) < 0.3) * torch.rand(
        D_SAE, slots, WIDTH, generator=generator) * values[..., None]
    acts = neighbours.clone()
    acts[:, :, PEAK] = values
    acts = torch.where(tokens == PAD_TOKEN, torch.zeros_like(acts), acts)
    tokens = torch.where(slot_used[..., None], tokens, torch.full_like(tokens, PAD_TOKEN))
    return values, tokens, acts * slot_used[..., None]


def synthetic_inputs() -> tuple[LatentExamples, list[str], LogitLens]:
    """40 latents: 0-3 dead, 5 dense, 7 peaking on a hostile token, 10-12 on " cat", 6 with only
    2 top examples; a logit lens whose latent 20 promotes " cat"."""
    generator = torch.Generator().manual_seed(0)
    peaks_top = torch.tensor(WORDS)[torch.randint(0, len(WORDS), (D_SAE, N_TOP), generator=generator)]
    peaks_top[HOSTILE_LATENT] = VOCAB.index(HOSTILE)
    peaks_top[list(CAT_LATENTS[:3])] = CAT
    peaks_sample = torch.tensor(WORDS)[torch.randint(0, len(WORDS), (D_SAE, N_SAMPLE), generator=generator)]
    used_top, used_sample = torch.full((D_SAE,), N_TOP), torch.full((D_SAE,), N_SAMPLE)
    used_top[list(DEAD)], used_sample[list(DEAD)] = 0, 0
    used_top[6], used_sample[6] = 2, 1
    top = _windows(generator, N_TOP, used_top, peaks_top)
    sample = _windows(generator, N_SAMPLE, used_sample, peaks_sample)
    top[1][HOSTILE_LATENT, 0, PEAK + 1:PEAK + 4] = torch.tensor([1, 2, 3])  # </script>, quotes, newline
    fire_count = torch.randint(5, 500, (D_SAE,), generator=generator)
    fire_count[list(DEAD)] = 0
    fire_count[DENSE] = N_TOKENS // 2
    hist_counts = torch.randint(0, 50, (D_SAE, 8), generator=generator)
    hist_counts[list(DEAD)] = 0
    examples = LatentExamples(*top, *sample, fire_count=fire_count, hist_edges=torch.linspace(-3, 1, 9),
                              hist_counts=hist_counts, n_tokens=N_TOKENS, peak_offset=PEAK,
                              meta={"model": "tiny", "site": "layers.0.resid_post", "note": HOSTILE})
    promoted = torch.tensor(WORDS)[torch.randint(0, len(WORDS), (D_SAE, 4), generator=generator)]
    promoted[CAT_LATENTS[3], 0] = CAT
    suppressed = torch.tensor([[1, 2, 0, 3]]).repeat(D_SAE, 1)
    lens = LogitLens(promoted, torch.rand(D_SAE, 4, generator=generator).sort(1, descending=True).values * 3,
                     suppressed, -torch.rand(D_SAE, 4, generator=generator).sort(1, descending=True).values)
    return examples, VOCAB, lens


def js_payload(path: Path, function: str):
    """The JSON argument of the one call in a data .js file."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith(function + "(") and text.endswith(");\n"), path
    return json.loads(text[len(function) + 1:-3])


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    examples, vocab, lens = synthetic_inputs()
    out = tmp_path_factory.mktemp("dashboard")
    index = write_dashboard(out, examples, vocab, lens, title='<b>T</b> & "x"', progress=False,
                            shard_size=SHARD_SIZE)
    assert index == out / "index.html"
    return out


def test_layout(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert sorted(p.name for p in (site / "assets").iterdir()) == ["common.js", "index.js", "latent.js", "style.css"]
    assert sorted(p.name for p in (site / "data").iterdir()) == [
        "explanations.js", "meta.js", "shard_0.js", "shard_1.js", "shard_2.js", "summary.js", "vocab.js"]
    assert (site / "data" / "explanations.js").read_text() == "jumpscopeExplanations({});\n"  # until autointerp
    assert sorted(int(p.stem) for p in (site / "latents").glob("*.html")) == list(range(D_SAE))
    page = (site / "latents" / "21.html").read_text()
    assert 'data-latent="21"' in page and "../data/shard_1.js" in page and len(page) < 700


def test_shards_round_trip(site: Path) -> None:
    examples, _, lens = synthetic_inputs()
    latents = [latent for shard in range(3) for latent in js_payload(site / "data" / f"shard_{shard}.js",
                                                                       "jumpscopeShard")["latents"]]
    assert [latent["id"] for latent in latents] == list(range(D_SAE))
    for i, latent in enumerate(latents):
        assert latent["fire_count"] == int(examples.fire_count[i])
        assert latent["hist_counts"] == examples.hist_counts[i].tolist()
        for kind in ("top", "sample"):
            values = getattr(examples, f"{kind}_values")[i]
            used = int((values > 0).sum())
            assert latent[f"{kind}_values"] == pytest.approx(values[:used].tolist(), rel=5e-3)
            assert latent[f"{kind}_tokens"] == getattr(examples, f"{kind}_tokens")[i, :used].tolist()
            dense = torch.zeros(used * WIDTH)
            dense[latent[f"{kind}_act_at"]] = torch.tensor(latent[f"{kind}_act"])
            assert dense.tolist() == pytest.approx(getattr(examples, f"{kind}_acts")[i, :used].flatten().tolist(),
                                                   rel=5e-3)
        for name in ("promoted_ids", "suppressed_ids"):
            assert latent[name] == getattr(lens, name)[i].tolist()
        for name in ("promoted_values", "suppressed_values"):
            assert latent[name] == pytest.approx(getattr(lens, name)[i].tolist(), rel=5e-3)
    assert latents[6]["top_tokens"] == examples.top_tokens[6, :2].tolist()  # unused slots dropped
    assert latents[0]["top_values"] == [] and latents[0]["top_act"] == []


def test_index_data_and_vocab(site: Path) -> None:
    examples, _, lens = synthetic_inputs()
    meta = js_payload(site / "data" / "meta.js", "jumpscopeMeta")
    assert (meta["d_sae"], meta["n_tokens"], meta["peak_offset"], meta["width"]) == (D_SAE, N_TOKENS, PEAK, WIDTH)
    assert meta["title"] == '<b>T</b> & "x"' and meta["source"]["note"] == HOSTILE and meta["has_logit_lens"]
    summary = js_payload(site / "data" / "summary.js", "jumpscopeSummary")
    assert summary["fire_count"] == examples.fire_count.tolist()
    assert summary["peak_tokens"][HOSTILE_LATENT] == [0] and summary["peak_tokens"][10] == [CAT]
    assert summary["peak_tokens"][0] == []
    assert summary["promoted"][20][0] == CAT
    vocab = js_payload(site / "data" / "vocab.js", "jumpscopeVocab")
    used = set(examples.top_tokens.flatten().tolist()) | set(examples.sample_tokens.flatten().tolist())
    used |= set(lens.promoted_ids.flatten().tolist()) | set(lens.suppressed_ids.flatten().tolist())
    assert vocab == {str(i): VOCAB[i] for i in sorted(used - {PAD_TOKEN})}  # hostile strings intact


def test_no_unescaped_data_in_any_file(site: Path) -> None:
    for path in site.rglob("*"):
        if path.is_dir() or path.suffix == ".css":
            continue
        text = path.read_text(encoding="utf-8")
        assert "<img" not in text and "onerror=alert" not in text.replace("onerror=alert(1)\\u003e", ""), path
        assert "\u2028" not in text and "\u2029" not in text, path
        if path.parent.name == "data":
            assert not re.search("[<>&]", text), path  # nothing in a data script can close the tag
        if path.suffix == ".html":  # every </script> closes one of our own <script src> tags
            assert text.count("</script>") == text.count("<script src="), path
    index = (site / "index.html").read_text()
    assert "&lt;b&gt;T&lt;/b&gt; &amp; &quot;x&quot;" in index and "<b>T</b>" not in index


def test_round_significant_gives_short_decimals() -> None:
    values = torch.tensor([0.123456, 123456.0, 0.000123456, 9.9999, -1.23456, 0.0, 1e-7], dtype=torch.float64)
    assert [repr(v) for v in round_significant(values).tolist()] == [
        "0.123", "123000.0", "0.000123", "10.0", "-1.23", "0.0", "1e-07"]


def test_frequent_peak_tokens_counts_and_breaks_ties_by_strength() -> None:
    examples, _, _ = synthetic_inputs()
    tokens = torch.full((1, 5, WIDTH), PAD_TOKEN)
    tokens[0, :, PEAK] = torch.tensor([11, 12, 12, 13, 11])
    one = replace(examples, top_tokens=tokens, top_values=torch.tensor([[5.0, 4, 3, 2, 0]]))
    assert frequent_peak_tokens(one, 3) == [[12, 11, 13]]  # the unused slot's 11 does not count


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    examples, vocab, lens = synthetic_inputs()
    short_lens = LogitLens(*(getattr(lens, name)[:-1] for name in ("promoted_ids", "promoted_values",
                                                                   "suppressed_ids", "suppressed_values")))
    with pytest.raises(ValueError, match="LogitLens.promoted_ids has 39 latents but LatentExamples has 40"):
        write_dashboard(tmp_path, examples, vocab, short_lens, progress=False)
    with pytest.raises(ValueError, match="token id 23 is used but the vocabulary has only 20 strings"):
        write_dashboard(tmp_path, examples, vocab[:20], lens, progress=False)
    bad_acts = examples.top_acts.clone()
    bad_acts[8, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="top_acts holds NaN"):
        write_dashboard(tmp_path, replace(examples, top_acts=bad_acts), vocab, progress=False)
    with pytest.raises(ValueError, match="top_acts windows are 8 wide, top_tokens. are 7"):
        write_dashboard(tmp_path, replace(examples, top_tokens=examples.top_tokens[..., :7]), vocab, progress=False)
    assert not (tmp_path / "index.html").exists()  # nothing written on bad input


def test_rewrite_with_fewer_latents_removes_stale_pages(tmp_path: Path) -> None:
    examples, vocab, _ = synthetic_inputs()
    write_dashboard(tmp_path, examples, vocab, progress=False, shard_size=SHARD_SIZE)
    fewer = replace(examples, **{name: getattr(examples, name)[:20] for name in (
        "top_values", "top_tokens", "top_acts", "sample_values", "sample_tokens", "sample_acts", "fire_count",
        "hist_counts")})
    write_dashboard(tmp_path, fewer, vocab, progress=False, shard_size=SHARD_SIZE)
    assert sorted(int(p.stem) for p in (tmp_path / "latents").glob("*.html")) == list(range(20))
    assert sorted(p.name for p in (tmp_path / "data").glob("shard_*.js")) == ["shard_0.js", "shard_1.js"]
    assert js_payload(tmp_path / "data" / "meta.js", "jumpscopeMeta")["has_logit_lens"] is False


def test_serve_serves_the_folder(site: Path, capsys) -> None:
    from jumpscope.cli.serve import make_server

    server = make_server(site, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/latents/3.html", timeout=10) as response:
            assert b'data-latent="3"' in response.read()
    finally:
        server.shutdown()
        server.server_close()
    assert main(["serve", str(site / "missing")]) == 2
    assert "no dashboard at" in capsys.readouterr().err


def test_logit_lens_ids_past_the_vocabulary_are_allowed(tmp_path: Path) -> None:
    """Padded unembeddings (more rows than tokenizer tokens) give lens ids with no string."""
    examples, vocab, lens = synthetic_inputs()
    promoted = lens.promoted_ids.clone()
    promoted[9, 0] = len(vocab) + 3
    write_dashboard(tmp_path, examples, vocab, replace(lens, promoted_ids=promoted), progress=False)
    assert str(len(vocab) + 3) not in js_payload(tmp_path / "data" / "vocab.js", "jumpscopeVocab")
    assert js_payload(tmp_path / "data" / "summary.js", "jumpscopeSummary")["promoted"][9][0] == len(vocab) + 3
