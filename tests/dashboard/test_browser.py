"""The dashboard in a real headless Chromium, opened from file:// URLs with no server: it loads
without console errors, lists, searches, sorts and filters the latents, renders a latent's
highlighted examples and histogram, and shows hostile token text as text (no tag, no alert).

Skipped where no Chromium is installed, except under CI=true, where that is a failure."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
from browser import Browser, find_chromium
from test_site import CAT_LATENTS, D_SAE, DEAD, DENSE, HOSTILE, HOSTILE_LATENT, N_SAMPLE, N_TOP, synthetic_inputs

from jumpscope.dashboard import write_dashboard

RECORD_ALERTS = """window.__dialogs = [];
for (const name of ["alert", "confirm", "prompt"]) window[name] = (m) => { window.__dialogs.push(String(m)); };"""
ROW_IDS = "[...document.querySelectorAll('#latents tbody tr td.id a')].map(a => Number(a.textContent))"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    binary = find_chromium()
    if binary is None:
        message = "no Chromium found (chromium, chromium-browser, google-chrome); apt-get install chromium"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI=true but {message}: the browser test must run in CI")
        pytest.skip(message)
    with Browser(binary, timeout=15) as chromium:
        chromium.add_init_script(RECORD_ALERTS)
        yield chromium


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    examples, vocab, lens = synthetic_inputs()
    out = tmp_path_factory.mktemp("dashboard")
    write_dashboard(out, examples, vocab, lens, title="Browser <i>test</i>", progress=False, shard_size=16)
    return out


def open_page(browser: Browser, path: Path) -> int:
    """Navigate to ``path`` as a file:// URL; returns the event index the page's events start at."""
    since = len(browser.events)
    browser.navigate(path.as_uri())
    return since


def assert_clean(browser: Browser, since: int) -> None:
    assert browser.console_errors(since) == []
    assert browser.dialogs(since) == [] and browser.evaluate("window.__dialogs") == []
    assert browser.evaluate("document.querySelectorAll('img, iframe, object, embed').length") == 0


def type_search(browser: Browser, text: str) -> list[int]:
    browser.evaluate(f"""(() => {{ const box = document.getElementById('search');
        box.value = {json.dumps(text)}; box.dispatchEvent(new Event('input', {{bubbles: true}})); }})()""")
    return browser.evaluate(ROW_IDS)


def test_index_lists_searches_sorts_and_marks(browser: Browser, site: Path) -> None:
    since = open_page(browser, site / "index.html")
    assert browser.evaluate(ROW_IDS) == list(range(D_SAE))
    assert browser.evaluate("document.title") == "Browser <i>test</i> · jumpscope"
    assert browser.evaluate("document.querySelectorAll('#density-histogram svg rect.bar').length") > 0
    assert browser.evaluate("[...document.querySelectorAll('tr.dead td.id a')].map(a => +a.textContent)") == list(DEAD)
    assert browser.evaluate("[...document.querySelectorAll('tr.dense td.id a')].map(a => +a.textContent)") == [DENSE]
    assert browser.evaluate("document.querySelectorAll('.mark.dead').length") == len(DEAD)
    assert browser.evaluate("document.querySelector('tr.dense .mark.dense').textContent") == "dense"
    assert browser.evaluate("document.querySelector('td.id a').getAttribute('href')") == "latents/0.html"

    assert type_search(browser, "CAT") == list(CAT_LATENTS)  # peak tokens and logit lens, any case
    assert type_search(browser, "onerror=") == [HOSTILE_LATENT]
    assert type_search(browser, "no such token") == []
    assert type_search(browser, "") == list(range(D_SAE))

    browser.evaluate("document.querySelector('th[data-sort=density]').click()")  # densest first
    ids = browser.evaluate(ROW_IDS)
    assert ids[0] == DENSE and sorted(ids[-len(DEAD):]) == list(DEAD)
    browser.evaluate("document.querySelector('th[data-sort=density]').click()")  # then the other way
    assert sorted(browser.evaluate(ROW_IDS)[:len(DEAD)]) == list(DEAD)
    browser.evaluate("const f = document.getElementById('filter'); f.value = 'dense';"
                     "f.dispatchEvent(new Event('change'))")
    assert browser.evaluate(ROW_IDS) == [DENSE]
    body = browser.evaluate("document.body.innerText")
    assert HOSTILE in body  # the source metadata and the peak token, as text
    assert_clean(browser, since)


def test_latent_page_renders_examples_histogram_and_hostile_text(browser: Browser, site: Path) -> None:
    examples, _, _ = synthetic_inputs()
    since = open_page(browser, site / "latents" / f"{HOSTILE_LATENT}.html")
    tokens = browser.evaluate("""[...document.querySelectorAll('.tok')].map(t => ({
        text: t.textContent, title: t.title, bg: t.style.backgroundColor, peak: t.classList.contains('peak')}))""")
    highlighted = [token for token in tokens if token["bg"]]
    assert highlighted and all(token["title"].startswith("activation ") for token in tokens)
    assert all("255, 110, 20" in token["bg"] for token in highlighted)  # rgb(...) at full strength
    peaks = [token for token in tokens if token["peak"]]
    assert len(peaks) == N_TOP + N_SAMPLE and all(token["bg"] for token in peaks)
    assert peaks[0]["text"] == HOSTILE
    assert peaks[0]["title"].startswith(f"activation {float(examples.top_values[HOSTILE_LATENT, 0]):.3g}")
    assert "\u23ce" in [token["text"] for token in tokens]  # the newline token, made visible
    bars = int((examples.hist_counts[HOSTILE_LATENT] > 0).sum())
    assert browser.evaluate("document.querySelectorAll('.activation-histogram svg.histogram rect.bar').length") == bars
    assert browser.evaluate("document.querySelectorAll('#top-examples .example').length") == N_TOP
    assert browser.evaluate("document.querySelectorAll('#sample-examples .example').length") == N_SAMPLE
    lens_text = browser.evaluate("document.querySelector('.logit-lens').innerText")
    assert "</script>" in lens_text and "\"quotes'&amp;" in lens_text
    body = browser.evaluate("document.body.innerText")
    assert HOSTILE in body and "Browser <i>test</i>" in body
    links = browser.evaluate("[...document.querySelectorAll('a[rel]')].map(a => a.getAttribute('href'))")
    assert links == [f"{HOSTILE_LATENT - 1}.html", f"{HOSTILE_LATENT + 1}.html"]
    assert_clean(browser, since)


def test_dead_latent_page(browser: Browser, site: Path) -> None:
    since = open_page(browser, site / "latents" / "0.html")
    assert "never fired" in browser.evaluate("document.body.innerText")
    assert browser.evaluate("document.querySelectorAll('.tok').length") == 0
    assert browser.evaluate("document.querySelector('h1 .mark.dead') !== null")
    assert browser.evaluate("document.querySelector('a[rel=prev]')") is None
    assert_clean(browser, since)


def test_index_shows_many_latents_a_page_at_a_time(browser: Browser, tmp_path: Path) -> None:
    examples, vocab, lens = synthetic_inputs()
    copies = 12  # 480 latents
    many = replace(examples, **{name: getattr(examples, name).repeat(copies, *[1] * (getattr(examples, name).dim() - 1))
                                for name in ("top_values", "top_tokens", "top_acts", "sample_values", "sample_tokens",
                                             "sample_acts", "fire_count", "hist_counts")})
    write_dashboard(tmp_path, many, vocab, progress=False)
    since = open_page(browser, tmp_path / "index.html")
    assert len(browser.evaluate(ROW_IDS)) == 200
    browser.evaluate("document.getElementById('more').click()")
    assert browser.evaluate(ROW_IDS) == list(range(400))
    browser.evaluate("document.getElementById('more').click()")
    assert len(browser.evaluate(ROW_IDS)) == D_SAE * copies
    assert browser.evaluate("document.getElementById('more').hidden") is True
    assert type_search(browser, "cat") == [i + D_SAE * k for k in range(copies) for i in CAT_LATENTS[:3]]
    since_latent = open_page(browser, tmp_path / "latents" / "479.html")  # the last shard, the last latent
    assert browser.evaluate("document.querySelector('a[rel=next]')") is None
    assert browser.evaluate("document.querySelectorAll('.tok.peak').length") > 0
    assert_clean(browser, since)
    assert browser.console_errors(since_latent) == []


def test_autointerp_explanations_show_search_sort_and_stay_text(browser: Browser, tmp_path: Path) -> None:
    from jumpscope.dashboard import write_explanations

    examples, vocab, lens = synthetic_inputs()
    write_dashboard(tmp_path, examples, vocab, lens, progress=False, shard_size=16)
    hostile = "<img src=x onerror=alert(1)> cats & dogs"
    records = [{"latent": 1, "kind": "sae", "explanation": "the word cat", "scores": {
                    "detection": {"accuracy": 0.9}, "fuzzing": {"accuracy": 0.7}, "simulation": {"correlation": 0.4}}},
               {"latent": 2, "kind": "sae", "explanation": hostile, "scores": {"detection": {"accuracy": 0.6}}},
               {"latent": 3, "kind": "sae", "explanation": "commas", "scores": {"detection": {"accuracy": 0.95}}}]
    write_explanations(tmp_path, records)
    since = open_page(browser, tmp_path / "index.html")
    headers = browser.evaluate("[...document.querySelectorAll('#latents thead th')].map(t => t.textContent)")
    assert headers[-4:] == ["explanation (autointerp)", "detection", "fuzzing", "simulation"]
    assert type_search(browser, "word cat") == [1]  # searchable by explanation
    assert type_search(browser, "cats & dogs") == [2]
    assert type_search(browser, "") == list(range(D_SAE))
    browser.evaluate("document.querySelector('th[data-sort=detection]').click()")  # best first, unscored last
    ids = browser.evaluate(ROW_IDS)
    assert ids[:3] == [3, 1, 2] and len(ids) == D_SAE
    cells = browser.evaluate("[...document.querySelectorAll('#latents tbody tr')].slice(0, 3).map("
                             "r => r.querySelector('td.explanation').textContent)")
    assert cells == ["commas", "the word cat", hostile]  # the LLM's text, as text
    assert_clean(browser, since)
    since = open_page(browser, tmp_path / "latents" / "2.html")
    assert browser.evaluate("document.querySelector('.explanation-text').textContent") == hostile
    assert "detection 0.600" in browser.evaluate("document.querySelector('section.explanation').innerText")
    assert_clean(browser, since)
