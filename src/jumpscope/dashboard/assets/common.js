/* jumpscope dashboard: what the index and latent pages share.
 *
 * The data files (data/*.js) call the jumpscope* functions below; they are <script src> files
 * because pages opened from file:// may not fetch() local files.
 *
 * SECURITY: token strings, explanations, the title and the source metadata are untrusted. They reach the page
 * only through textContent / createTextNode / the title property, never through innerHTML.
 */
"use strict";

var jumpscope = { meta: null, vocab: null, summary: null, shards: {}, explanations: {} };

function jumpscopeMeta(meta) { jumpscope.meta = meta; }
function jumpscopeVocab(vocab) { jumpscope.vocab = vocab; }
function jumpscopeSummary(summary) { jumpscope.summary = summary; }
function jumpscopeShard(shard) { jumpscope.shards[shard.shard] = shard; }
/* autointerp's explanations (an LLM's text: untrusted like the tokens) and scores, by latent id */
function jumpscopeExplanations(explanations) { jumpscope.explanations = explanations || {}; }

/** A score cell's text: 3 decimals, or a dash when there is none. */
function scoreText(value) { return value === null || value === undefined ? "\u2013" : Number(value).toFixed(3); }

var PAD_TOKEN = -1;
var SVG_NS = "http://www.w3.org/2000/svg";

/** A new element with an optional class and text (set as text, never parsed as HTML). */
function el(tag, className, text) {
  var node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

/** A new SVG element with numeric / fixed attributes (never data strings). */
function svgEl(tag, attrs) {
  var node = document.createElementNS(SVG_NS, tag);
  for (var key in attrs) node.setAttribute(key, attrs[key]);
  return node;
}

/** The raw text of a token id ("" for padding; a placeholder if the vocabulary lacks it). */
function tokenText(id) {
  if (id === PAD_TOKEN) return "";
  var text = jumpscope.vocab ? jumpscope.vocab[id] : undefined;
  return text === undefined ? "\u27e8" + id + "\u27e9" : text;
}

/** Token text with invisible characters made visible: newline as ⏎, tab as ⇥, other control
 * characters as their Unicode control pictures, the empty string as ∅. Spaces stay spaces
 * (shown by white-space: pre). */
function displayToken(text) {
  if (text === "") return "\u2205";
  return text.replace(/\r\n|\n/g, "\u23ce").replace(/\t/g, "\u21e5").replace(/[\u0000-\u001f\u007f]/g,
    function (c) { return c === "\u007f" ? "\u2421" : String.fromCharCode(0x2400 + c.charCodeAt(0)); });
}

/** A token "chip": its display text, with its raw text and id on hover. */
function tokenChip(id, extraTitle) {
  var chip = el("span", "chip", displayToken(tokenText(id)));
  chip.title = JSON.stringify(tokenText(id)) + " (id " + id + ")" + (extraTitle || "");
  return chip;
}

/** A number with 3 significant digits, without exponent noise for ordinary magnitudes. */
function fmt(x) {
  if (x === 0) return "0";
  var abs = Math.abs(x);
  if (abs >= 1e-3 && abs < 1e5) return String(Number(x.toPrecision(3)));
  return x.toExponential(2);
}

function densityOf(fireCount) {
  return fireCount / Math.max(jumpscope.meta.n_tokens, 1);
}

/** "dead" (never fired), "dense" (fires on more than the threshold) or "". */
function densityClass(fireCount) {
  if (fireCount === 0) return "dead";
  return densityOf(fireCount) > jumpscope.meta.dense_threshold ? "dense" : "";
}

var SUPERSCRIPTS = { "-": "\u207b", "0": "\u2070", "1": "\u00b9", "2": "\u00b2", "3": "\u00b3", "4": "\u2074",
  "5": "\u2075", "6": "\u2076", "7": "\u2077", "8": "\u2078", "9": "\u2079" };

/** "10⁻³" for k = -3. */
function powerOfTen(k) {
  return "10" + String(k).split("").map(function (c) { return SUPERSCRIPTS[c] || c; }).join("");
}

/**
 * An SVG bar chart of counts over bins whose edges are log10 values; ticks at whole powers of
 * ten. options: {width, height, label (x axis), unit (hover text: what is counted)}.
 */
function histogramSvg(counts, edges, options) {
  var width = options.width || 640, height = options.height || 160;
  var left = 44, right = 10, top = 8, bottom = 36;
  var plotW = width - left - right, plotH = height - top - bottom;
  var lo = edges[0], hi = edges[edges.length - 1], span = (hi - lo) || 1;
  var maxCount = Math.max.apply(null, counts.concat([1]));
  var svg = svgEl("svg", { "class": "histogram", width: width, height: height,
    viewBox: "0 0 " + width + " " + height, role: "img" });
  var caption = svgEl("title", {});
  caption.textContent = options.label;
  svg.appendChild(caption);
  var x = function (v) { return left + (v - lo) / span * plotW; };
  svg.appendChild(svgEl("line", { x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH, "class": "axis" }));
  svg.appendChild(svgEl("line", { x1: left, y1: top, x2: left, y2: top + plotH, "class": "axis" }));
  for (var i = 0; i < counts.length; i++) {
    if (!counts[i]) continue;
    var h = counts[i] / maxCount * plotH;
    var barWidth = Math.max(x(edges[i + 1]) - x(edges[i]) - 1, 1);
    var bar = svgEl("rect", { x: x(edges[i]) + 0.5, y: top + plotH - h, width: barWidth, height: h, "class": "bar" });
    var tip = svgEl("title", {});
    tip.textContent = counts[i] + " " + (options.unit || "") + " in [" + fmt(Math.pow(10, edges[i])) + ", " +
      fmt(Math.pow(10, edges[i + 1])) + ")";
    bar.appendChild(tip);
    svg.appendChild(bar);
  }
  var step = span > 12 ? 2 : 1;
  for (var k = Math.ceil(lo); k <= Math.floor(hi); k += step) {
    svg.appendChild(svgEl("line", { x1: x(k), y1: top + plotH, x2: x(k), y2: top + plotH + 4, "class": "axis" }));
    var tick = svgEl("text", { x: x(k), y: top + plotH + 16, "class": "tick", "text-anchor": "middle" });
    tick.textContent = powerOfTen(k);
    svg.appendChild(tick);
  }
  var yTick = svgEl("text", { x: left - 4, y: top + 10, "class": "tick", "text-anchor": "end" });
  yTick.textContent = String(maxCount);
  svg.appendChild(yTick);
  var xLabel = svgEl("text", { x: left + plotW / 2, y: height - 4, "class": "axis-label", "text-anchor": "middle" });
  xLabel.textContent = options.label;
  svg.appendChild(xLabel);
  return svg;
}

/** The source metadata (model, site, SAE, ...) as a definition list, values as text. */
function fillSource(list, source) {
  if (!source) return;
  Object.keys(source).forEach(function (key) {
    var value = source[key];
    list.appendChild(el("dt", null, key));
    list.appendChild(el("dd", null, typeof value === "string" ? value : JSON.stringify(value)));
  });
}
