/* jumpscope dashboard: the index of all latents (needs common.js and data/meta.js, vocab.js,
 * summary.js loaded first). Rows are rendered PAGE at a time, so 16k latents stay responsive. */
"use strict";

(function () {
  var PAGE = 200;
  var SEPARATOR = "\u0000";  // between tokens in the search text, so a query never spans two tokens
  var state = { query: "", filter: "all", sort: "id", desc: false, shown: PAGE };
  var latents = [], matches = [];
  var SCORES = ["detection", "fuzzing", "simulation"];
  var hasExplanations = false;

  function buildLatents() {
    var summary = jumpscope.summary;
    return summary.fire_count.map(function (fire, id) {
      var peaks = summary.peak_tokens[id] || [];
      var promoted = summary.promoted ? summary.promoted[id] : [];
      var words = peaks.concat(promoted).map(tokenText);
      var found = jumpscope.explanations[String(id)] || {};
      var explanation = found.explanation || "";
      var latent = { id: id, fire: fire, density: densityOf(fire), max: summary.max_act[id], peaks: peaks,
        promoted: promoted, kind: densityClass(fire), explanation: explanation,
        search: words.concat([explanation]).join(SEPARATOR).toLowerCase() };
      SCORES.forEach(function (name) { latent[name] = typeof found[name] === "number" ? found[name] : null; });
      return latent;
    });
  }

  function readHash() {
    var params = new URLSearchParams(location.hash.slice(1));
    if (params.has("q")) state.query = params.get("q");
    if (["all", "alive", "dead", "dense"].indexOf(params.get("f")) >= 0) state.filter = params.get("f");
    if (["id", "density", "max"].concat(SCORES).indexOf(params.get("s")) >= 0) state.sort = params.get("s");
    state.desc = params.get("d") === "1";
  }

  function writeHash() {
    var params = new URLSearchParams({ q: state.query, f: state.filter, s: state.sort, d: state.desc ? "1" : "0" });
    try { history.replaceState(null, "", "#" + params.toString()); } catch (error) { /* not essential */ }
  }

  function keep(latent, query) {
    if (state.filter === "alive" && latent.kind === "dead") return false;
    if ((state.filter === "dead" || state.filter === "dense") && latent.kind !== state.filter) return false;
    return query === "" || latent.search.indexOf(query) >= 0;
  }

  function compare(a, b) {
    var key = state.sort === "density" ? "fire" : state.sort === "id" ? "id" : state.sort;
    if (SCORES.indexOf(key) >= 0 && (a[key] === null) !== (b[key] === null)) {
      return a[key] === null ? 1 : -1;  // unscored latents last, whichever the direction
    }
    var order = (a[key] - b[key]) || (a.id - b.id);
    return state.desc ? -order : order;
  }

  function update() {
    var query = state.query.toLowerCase();
    matches = latents.filter(function (latent) { return keep(latent, query); });
    matches.sort(compare);
    renderRows();
    document.querySelectorAll("th.sortable").forEach(function (th) {
      var active = th.dataset.sort === state.sort;
      th.classList.toggle("asc", active && !state.desc);
      th.classList.toggle("desc", active && state.desc);
      th.setAttribute("aria-sort", active ? (state.desc ? "descending" : "ascending") : "none");
    });
    writeHash();
  }

  function chips(ids) {
    var cell = el("td", "tokens");
    ids.forEach(function (id) { cell.appendChild(tokenChip(id)); });
    return cell;
  }

  function row(latent) {
    var tr = el("tr", latent.kind);
    var idCell = el("td", "id");
    var link = el("a", null, latent.id);
    link.href = "latents/" + latent.id + ".html";
    idCell.appendChild(link);
    if (latent.kind) idCell.appendChild(el("span", "mark " + latent.kind, latent.kind));
    tr.appendChild(idCell);
    var density = el("td", "num");
    if (latent.fire === 0) {
      density.appendChild(el("span", null, "0"));
      density.appendChild(el("span", "muted", " never fired"));
    } else {
      density.appendChild(el("span", null, fmt(latent.density)));
      density.appendChild(el("span", "muted", " log\u2081\u2080 " + Math.log10(latent.density).toFixed(2)));
    }
    tr.appendChild(density);
    tr.appendChild(el("td", "num", fmt(latent.max)));
    tr.appendChild(chips(latent.peaks));
    if (jumpscope.meta.has_logit_lens) tr.appendChild(chips(latent.promoted));
    if (hasExplanations) {
      tr.appendChild(el("td", "explanation", latent.explanation));
      SCORES.forEach(function (name) { tr.appendChild(el("td", "num", scoreText(latent[name]))); });
    }
    return tr;
  }

  function renderRows() {
    var body = document.querySelector("#latents tbody");
    var fragment = document.createDocumentFragment();
    var count = Math.min(state.shown, matches.length);
    for (var i = 0; i < count; i++) fragment.appendChild(row(matches[i]));
    body.replaceChildren(fragment);
    document.getElementById("count").textContent = "showing " + count + " of " + matches.length +
      " matching latents (" + latents.length + " in all)";
    var more = document.getElementById("more");
    more.hidden = count >= matches.length;
    more.textContent = "show " + Math.min(PAGE, matches.length - count) + " more";
  }

  function densityHistogram(container) {
    var alive = latents.filter(function (l) { return l.fire > 0; });
    var dead = latents.length - alive.length;
    if (!alive.length) {
      container.appendChild(el("p", "muted", "No latent fired on the " + jumpscope.meta.n_tokens + " tokens scanned."));
      return;
    }
    var logs = alive.map(function (l) { return Math.log10(l.density); });
    // Bins a quarter decade wide, from the sparsest latent up to density 1.
    var lo = Math.floor(Math.min.apply(null, logs) * 4) / 4;
    var hi = Math.max(0, Math.ceil(Math.max.apply(null, logs) * 4) / 4);
    var bins = Math.max(Math.round((hi - lo) * 4), 1), edges = [], counts = [];
    for (var i = 0; i <= bins; i++) edges.push(lo + i * (hi - lo) / bins);
    for (i = 0; i < bins; i++) counts.push(0);
    logs.forEach(function (v) { counts[Math.min(Math.floor((v - lo) / (hi - lo) * bins), bins - 1)] += 1; });
    container.appendChild(histogramSvg(counts, edges, { width: 720, height: 170, unit: "latents",
      label: "fraction of tokens a latent fires on (log scale); dead latents: " + dead }));
  }

  function addExplanationColumns() {
    var header = document.querySelector("#latents thead tr");
    header.appendChild(el("th", null, "explanation (autointerp)"));
    SCORES.forEach(function (name) {
      var th = el("th", "sortable", name);
      th.dataset.sort = name;
      header.appendChild(th);
    });
    document.getElementById("search").placeholder = "Filter by token or explanation";
  }

  function start() {
    if (!jumpscope.meta || !jumpscope.summary || !jumpscope.vocab) {
      document.body.appendChild(el("p", "error", "The dashboard's data files (data/*.js) did not load."));
      return;
    }
    var meta = jumpscope.meta;
    hasExplanations = Object.keys(jumpscope.explanations || {}).length > 0;
    if (hasExplanations) addExplanationColumns();
    latents = buildLatents();
    var dead = latents.filter(function (l) { return l.kind === "dead"; }).length;
    var dense = latents.filter(function (l) { return l.kind === "dense"; }).length;
    document.getElementById("summary").textContent = meta.d_sae + " latents over " + meta.n_tokens +
      " tokens; " + dead + " dead (never fired), " + dense + " dense (fire on more than " +
      meta.dense_threshold * 100 + "% of tokens)";
    fillSource(document.getElementById("source"), meta.source);
    densityHistogram(document.getElementById("density-histogram"));
    readHash();
    var search = document.getElementById("search"), filter = document.getElementById("filter");
    search.value = state.query;
    filter.value = state.filter;
    search.addEventListener("input", function () { state.query = search.value; state.shown = PAGE; update(); });
    filter.addEventListener("change", function () { state.filter = filter.value; state.shown = PAGE; update(); });
    document.querySelectorAll("th.sortable").forEach(function (th) {
      th.tabIndex = 0;
      var sortBy = function () {
        if (state.sort === th.dataset.sort) state.desc = !state.desc;
        else { state.sort = th.dataset.sort; state.desc = th.dataset.sort !== "id"; }
        update();
      };
      th.addEventListener("click", sortBy);
      th.addEventListener("keydown", function (event) { if (event.key === "Enter") sortBy(); });
    });
    document.getElementById("more").addEventListener("click", function () { state.shown += PAGE; renderRows(); });
    update();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
