/* jumpscope dashboard: one latent's page (needs common.js, data/meta.js, vocab.js and the latent's
 * shard loaded first; the page's <body data-latent="N"> says which latent). */
"use strict";

(function () {
  function findLatent(id) {
    var meta = jumpscope.meta;
    var shard = jumpscope.shards[Math.floor(id / meta.shard_size)];
    return shard ? shard.latents[id - shard.first] : undefined;
  }

  function navigation(id) {
    var nav = el("nav", "latent-nav");
    var link = function (text, href, rel) {
      var a = el("a", null, text);
      a.href = href;
      if (rel) a.rel = rel;
      return a;
    };
    nav.appendChild(link("\u2190 all latents", "../index.html"));
    if (id > 0) nav.appendChild(link("\u2039 latent " + (id - 1), (id - 1) + ".html", "prev"));
    if (id + 1 < jumpscope.meta.d_sae) {
      nav.appendChild(link("latent " + (id + 1) + " \u203a", (id + 1) + ".html", "next"));
    }
    var go = el("input");
    go.type = "number";
    go.min = 0;
    go.max = jumpscope.meta.d_sae - 1;
    go.placeholder = "go to latent";
    go.setAttribute("aria-label", "go to latent");
    go.addEventListener("keydown", function (event) {
      var target = parseInt(go.value, 10);
      if (event.key === "Enter" && target >= 0 && target < jumpscope.meta.d_sae) location.href = target + ".html";
    });
    nav.appendChild(go);
    document.addEventListener("keydown", function (event) {
      if (event.target.tagName === "INPUT") return;
      var rel = event.key === "ArrowLeft" ? "prev" : event.key === "ArrowRight" ? "next" : null;
      var target = rel && nav.querySelector("a[rel=" + rel + "]");
      if (target) location.href = target.href;
    });
    return nav;
  }

  function stats(latent) {
    var meta = jumpscope.meta, list = el("dl", "stats");
    var add = function (term, value) {
      list.appendChild(el("dt", null, term));
      list.appendChild(el("dd", null, value));
    };
    var density = densityOf(latent.fire_count);
    var log = latent.fire_count ? "  (log\u2081\u2080 " + Math.log10(density).toFixed(2) + ")" : "";
    add("density", fmt(density) + log);
    add("fired on", latent.fire_count + " of " + meta.n_tokens + " tokens");
    add("max activation", fmt(latent.max_act));
    return list;
  }

  /** What the logit lens measures, and where it means most (plain text: set as textContent). */
  function lensNote(source) {
    var where = "";
    if (typeof source.layer === "number" && typeof source.n_layers === "number") {
      where = " (this SAE: layers." + source.layer + ", of " + source.n_layers + " layers)";
    }
    return "Logit lens: the latent's direct effect on the output logits (decoder direction times the " +
      "unembedding, skipping the later layers); most meaningful near the last layers" + where + ".";
  }

  function lensTable(caption, ids, values) {
    var table = el("table", "lens");
    table.appendChild(el("caption", null, caption));
    ids.forEach(function (id, i) {
      var tr = el("tr");
      var cell = el("td");
      cell.appendChild(tokenChip(id));
      tr.appendChild(cell);
      tr.appendChild(el("td", "num", (values[i] > 0 ? "+" : "") + fmt(values[i])));
      table.appendChild(tr);
    });
    return table;
  }

  /** One example window: each token's background is its activation over the latent's max. */
  function exampleRow(value, tokens, acts, maxAct) {
    var row = el("div", "example");
    row.appendChild(el("span", "value", fmt(value)));
    var text = el("span", "tokens");
    var peak = jumpscope.meta.peak_offset;
    for (var i = 0; i < tokens.length; i++) {
      if (tokens[i] === PAD_TOKEN) continue;
      var raw = tokenText(tokens[i]);
      var tok = el("span", i === peak ? "tok peak" : "tok", displayToken(raw));
      var strength = maxAct > 0 ? Math.min(Math.max(acts[i] / maxAct, 0), 1) : 0;
      if (acts[i] > 0) tok.style.backgroundColor = "rgba(255, 110, 20, " + (0.08 + 0.92 * strength).toFixed(3) + ")";
      tok.title = "activation " + fmt(acts[i]) + "\ntoken " + JSON.stringify(raw) + " (id " + tokens[i] + ")";
      text.appendChild(tok);
    }
    row.appendChild(text);
    return row;
  }

  /** Dense activation windows from the shard's sparse form: positions example * width + token. */
  function windowActs(positions, values, examples) {
    var width = jumpscope.meta.width, windows = [];
    for (var e = 0; e < examples; e++) windows.push(new Float64Array(width));
    positions.forEach(function (at, i) {
      var e = Math.floor(at / width);
      if (e < examples) windows[e][at % width] = values[i];
    });
    return windows;
  }

  function exampleSection(heading, note, latent, kind) {
    var section = el("section", "examples");
    section.id = kind + "-examples";
    section.appendChild(el("h2", null, heading));
    if (note) section.appendChild(el("p", "muted", note));
    var values = latent[kind + "_values"], tokens = latent[kind + "_tokens"];
    var acts = windowActs(latent[kind + "_act_at"], latent[kind + "_act"], values.length);
    if (!values.length) section.appendChild(el("p", "muted", "none"));
    values.forEach(function (value, i) { section.appendChild(exampleRow(value, tokens[i], acts[i], latent.max_act)); });
    return section;
  }

  function render(main, id, latent) {
    var meta = jumpscope.meta, kind = densityClass(latent.fire_count);
    var heading = el("h1", null, "Latent " + id);
    if (kind) heading.appendChild(el("span", "mark " + kind, kind));
    main.appendChild(heading);
    if (meta.title) main.appendChild(el("p", "subtitle", meta.title));
    main.appendChild(stats(latent));
    var found = (jumpscope.explanations || {})[String(id)];
    if (found && found.explanation) {
      var section = el("section", "explanation");
      section.appendChild(el("h2", null, "Explanation (autointerp)"));
      section.appendChild(el("p", "explanation-text", found.explanation));
      section.appendChild(el("p", "muted", "detection " + scoreText(found.detection) + " \u00b7 fuzzing " +
        scoreText(found.fuzzing) + " (balanced accuracy, chance 0.5) \u00b7 simulation " +
        scoreText(found.simulation) + " (correlation)"));
      main.appendChild(section);
    }
    if (!latent.fire_count) {
      main.appendChild(el("p", "muted", "This latent never fired on the " + meta.n_tokens + " tokens scanned."));
    } else {
      var hist = el("section", "activation-histogram");
      hist.appendChild(el("h2", null, "Activations"));
      hist.appendChild(histogramSvg(latent.hist_counts, meta.hist_edges,
        { width: 640, height: 160, unit: "activations", label: "activation (log scale)" }));
      main.appendChild(hist);
    }
    if (meta.has_logit_lens) {
      var lens = el("section", "logit-lens");
      lens.appendChild(el("h2", null, "Logit lens"));
      lens.appendChild(el("p", "muted lens-note", lensNote(meta.source || {})));
      var pair = el("div", "lens-pair");
      pair.appendChild(lensTable("promoted", latent.promoted_ids, latent.promoted_values));
      pair.appendChild(lensTable("suppressed", latent.suppressed_ids, latent.suppressed_values));
      lens.appendChild(pair);
      main.appendChild(lens);
    }
    if (latent.fire_count) {
      main.appendChild(exampleSection("Top activations", null, latent, "top"));
      main.appendChild(exampleSection("Random sample of activating contexts",
        "A uniform sample of the contexts where it fired, strongest first: the latent's typical behaviour.",
        latent, "sample"));
    }
  }

  function start() {
    var id = parseInt(document.body.dataset.latent, 10);
    var main = el("main");
    document.body.appendChild(main);
    if (!jumpscope.meta || !jumpscope.vocab) {
      main.appendChild(el("p", "error", "The dashboard's data files (data/*.js) did not load."));
      return;
    }
    document.title = "Latent " + id + (jumpscope.meta.title ? " \u00b7 " + jumpscope.meta.title : "");
    main.appendChild(navigation(id));
    var latent = findLatent(id);
    if (!latent) {
      main.appendChild(el("p", "error", "No data for latent " + id + ": its shard file did not load."));
      return;
    }
    render(main, id, latent);
  }

  document.addEventListener("DOMContentLoaded", start);
})();
