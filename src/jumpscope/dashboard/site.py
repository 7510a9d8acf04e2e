"""Writing the static dashboard: index.html, one tiny page per latent, data shards, assets.

Layout of ``out_dir``::

    index.html              the table of all latents (assets/index.js renders it)
    latents/<id>.html       a shell per latent: sets its id, loads the assets and its shard
    data/meta.js            jumpscopeMeta({...}): sizes, title, histogram edges, source
    data/vocab.js           jumpscopeVocab({"<id>": "<token text>", ...}): only the ids used
    data/summary.js         jumpscopeSummary({...}): the index's columns for every latent
    data/shard_<n>.js       jumpscopeShard({...}): everything about latents n*S .. (n+1)*S - 1
    data/explanations.js    jumpscopeExplanations({...}): autointerp's explanations and scores
                            (empty until `jumpscope autointerp --examples <this folder>` fills it)
    assets/                 style.css, common.js, index.js, latent.js

Data travels as ``<script src>`` files calling a global function, because a page opened from a
file:// URL may not fetch() or XHR local files in Chromium, while script tags work.
"""

from __future__ import annotations

import dataclasses
import html
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..analysis.records import LatentExamples, LogitLens
from .payload import (check_inputs, max_activation, meta_payload, shard_count, shard_payloads, summary_payload,
                      vocab_payload)

SHARD_SIZE = 128
"""Latents per data shard: a latent page parses its whole shard, so smaller loads faster."""
ASSETS = ("style.css", "common.js", "index.js", "latent.js")

# Characters that could end a <script> element or open an HTML comment, and the two that old JS
# engines took for line ends inside string literals, written as JSON \u escapes instead.
_SCRIPT_UNSAFE = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                  ("\u2029", "\\u2029"))


def script_json(value: Any) -> str:
    """JSON text of ``value`` that is safe inside a <script> (ASCII only, no ``<``, ``>``, ``&``)."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, default=str)
    for unsafe, escaped in _SCRIPT_UNSAFE:  # str.replace: a pass over 100 MB takes milliseconds
        text = text.replace(unsafe, escaped)
    return text


def script_call(function: str, value: Any) -> str:
    """The text of a .js data file: one call of the global ``function`` with ``value``."""
    return f"{function}({script_json(value)});\n"


def index_html(title: str, has_logit_lens: bool) -> str:
    """The index page's HTML; ``title`` is escaped here, everything else is rendered by index.js."""
    heading = html.escape(title) if title else "SAE latents"
    lens_header = '<th data-sort="none">logit lens: promoted</th>' if has_logit_lens else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{heading} · jumpscope</title>
<link rel="stylesheet" href="assets/style.css">
</head>
<body class="index-page">
<header>
<h1>{heading}</h1>
<p id="summary" class="muted"></p>
<dl id="source" class="source"></dl>
</header>
<section id="density-section">
<h2>Latent density (log10 of the fraction of tokens each latent fires on)</h2>
<div id="density-histogram"></div>
</section>
<section>
<div class="controls">
<input id="search" type="search" placeholder="Filter by token (peak tokens, logit lens)" autocomplete="off"
 aria-label="Filter latents by token">
<select id="filter" aria-label="Which latents">
<option value="all">all latents</option>
<option value="alive">alive only</option>
<option value="dead">dead only</option>
<option value="dense">dense only</option>
</select>
<span id="count" class="muted"></span>
</div>
<table id="latents">
<thead><tr>
<th data-sort="id" class="sortable">latent</th>
<th data-sort="density" class="sortable">density</th>
<th data-sort="max" class="sortable">max act</th>
<th data-sort="none">top peak tokens</th>
{lens_header}
</tr></thead>
<tbody></tbody>
</table>
<button id="more" type="button" hidden>show more</button>
</section>
<noscript>This dashboard needs JavaScript.</noscript>
<script src="assets/common.js"></script>
<script src="data/meta.js"></script>
<script src="data/vocab.js"></script>
<script src="data/summary.js"></script>
<script src="data/explanations.js"></script>
<script src="assets/index.js"></script>
</body>
</html>
"""


def latent_html(latent: int, shard: int) -> str:
    """The shell of one latent's page: latent.js renders it from the shard's data."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Latent {latent}</title>'
            f'<link rel="stylesheet" href="../assets/style.css"></head><body class="latent-page" '
            f'data-latent="{latent}"><noscript>This dashboard needs JavaScript.</noscript>'
            f'<script src="../assets/common.js"></script><script src="../data/meta.js"></script>'
            f'<script src="../data/vocab.js"></script><script src="../data/shard_{shard}.js"></script>'
            f'<script src="../data/explanations.js"></script>'
            f'<script src="../assets/latent.js"></script></body></html>\n')


def copy_assets(out_dir: Path) -> None:
    """Copy the hand-written CSS/JS shipped with the package into ``out_dir / assets``."""
    target = out_dir / "assets"
    target.mkdir(parents=True, exist_ok=True)
    source = resources.files("jumpscope.dashboard") / "assets"
    for name in ASSETS:
        with resources.as_file(source / name) as path:
            shutil.copyfile(path, target / name)


def remove_stale_pages(out_dir: Path, d_sae: int, n_shards: int) -> None:
    """Delete latent pages and shards a previous, larger dashboard left in ``out_dir``."""
    for page in (out_dir / "latents").glob("*.html"):
        if page.stem.isdigit() and int(page.stem) >= d_sae:
            page.unlink()
    for shard in (out_dir / "data").glob("shard_*.js"):
        number = shard.stem.removeprefix("shard_")
        if number.isdigit() and int(number) >= n_shards:
            shard.unlink()


def write_dashboard(out_dir: str | Path, examples: LatentExamples, vocab: list[str],
                    logit_lens: LogitLens | None = None, title: str = "", progress: bool = True,
                    shard_size: int = SHARD_SIZE) -> Path:
    """Write a static dashboard of ``examples`` (and ``logit_lens``) to ``out_dir`` and return the
    path of its ``index.html``. It opens straight from the file system (file:// URL), no server
    needed. ``vocab[i]`` is the display text of token id i (e.g. from
    :func:`jumpscope.analysis.token_strings`); it is untrusted and only ever rendered as text.
    Raises ValueError when the inputs disagree (latent counts, token ids beyond the vocabulary)."""
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    examples, logit_lens = on_cpu(examples), on_cpu(logit_lens) if logit_lens is not None else None
    check_inputs(examples, vocab, logit_lens)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    (out_dir / "latents").mkdir(parents=True, exist_ok=True)
    n_shards = shard_count(examples.d_sae, shard_size)
    remove_stale_pages(out_dir, examples.d_sae, n_shards)
    copy_assets(out_dir)

    max_act = max_activation(examples)
    has_lens = logit_lens is not None
    meta = meta_payload(examples, title, shard_size, has_lens)
    write(out_dir / "data" / "meta.js", script_call("jumpscopeMeta", meta))
    write(out_dir / "data" / "vocab.js", script_call("jumpscopeVocab", vocab_payload(examples, vocab, logit_lens)))
    write(out_dir / "data" / "summary.js",
          script_call("jumpscopeSummary", summary_payload(examples, logit_lens, max_act)))
    payloads = shard_payloads(examples, logit_lens, max_act, shard_size)
    for payload in tqdm(payloads, total=n_shards, desc="dashboard", unit="shard", disable=not progress):
        shard = payload["shard"]
        write(out_dir / "data" / f"shard_{shard}.js", script_call("jumpscopeShard", payload))
        for latent in range(payload["first"], payload["first"] + len(payload["latents"])):
            write(out_dir / "latents" / f"{latent}.html", latent_html(latent, shard))
    if not (out_dir / "data" / "explanations.js").is_file():  # autointerp's, if any, stay
        write(out_dir / "data" / "explanations.js", script_call("jumpscopeExplanations", {}))
    index = out_dir / "index.html"
    write(index, index_html(title, has_lens))
    return index


def write_explanations(out_dir: str | Path, records: list[dict[str, Any]]) -> Path:
    """Put autointerp ``records`` (as ``results.jsonl`` holds them) on a dashboard's index and latent
    pages: ``data/explanations.js`` maps each latent id to its explanation and scores. The
    explanation is an LLM's untrusted text: the pages render it as text only."""
    out_dir = Path(out_dir)
    if not (out_dir / "data" / "meta.js").is_file():
        raise ValueError(f"{out_dir} is not a jumpscope dashboard (no data/meta.js)")
    table = {}
    for record in records:
        scores = record.get("scores", {})
        table[str(int(record["latent"]))] = {
            "explanation": record.get("explanation") or "",
            "detection": scores.get("detection", {}).get("accuracy"),
            "fuzzing": scores.get("fuzzing", {}).get("accuracy"),
            "simulation": scores.get("simulation", {}).get("correlation")}
    path = out_dir / "data" / "explanations.js"
    write(path, script_call("jumpscopeExplanations", table))
    return path

def on_cpu(record: Any) -> Any:
    """A copy of a LatentExamples / LogitLens with every tensor on the CPU (no copy when already)."""
    return dataclasses.replace(record, **{field.name: getattr(record, field.name).cpu()
                                          for field in dataclasses.fields(record)
                                          if isinstance(getattr(record, field.name), torch.Tensor)})


def write(path: Path, text: str) -> None:
    # Plain writes, not safeio's fsync'd atomic ones: the site is regenerable, and 16k fsyncs
    # would take longer than building it.
    path.write_text(text, encoding="utf-8")
