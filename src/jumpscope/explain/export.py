"""Autointerp results as files others read: a flat CSV and JSON, a summary of scores by kind
(the SAE's latents against the random-direction controls), and Neuronpedia's bulk layout.

Neuronpedia's public exports hold, per model and source, gzipped JSON-lines batches of
``features``, ``activations`` and ``explanations``; :func:`write_neuronpedia` writes the same
layout and field names (``modelId``, ``layer`` = the source id, ``index`` as a string, ...), from
the examples the explanations were written from, so the results can be shared or uploaded. Check
the field list against Neuronpedia's current upload documentation before an upload: the layout
is theirs and may move.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..analysis.records import PAD_TOKEN, LatentExamples
from ..safeio import write_text

__all__ = ["flat_rows", "write_tables", "score_summary", "write_neuronpedia", "SCORE_COLUMNS"]

SCORE_COLUMNS = (("detection", "detection", "accuracy"), ("detection_auc", "detection", "auc"),
                 ("fuzzing", "fuzzing", "accuracy"), ("fuzzing_auc", "fuzzing", "auc"),
                 ("simulation", "simulation", "correlation"))
"""(column, scorer, key in the scorer's record): every score a table or summary shows. The AUCs
exist where one context went per request and the backend gave token logprobs."""


def flat_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per latent: id, kind, explanation, each score, failures, tokens used."""
    rows = []
    for record in records:
        scores = record.get("scores", {})
        usage = record.get("usage", {})
        row = {"latent": record["latent"], "kind": record["kind"], "explanation": record.get("explanation") or "",
               "skipped": record.get("skipped") or record.get("error") or ""}
        for column, scorer, key in SCORE_COLUMNS:
            row[column] = scores.get(scorer, {}).get(key)
        row.update(failed_requests=usage.get("failed", 0), requests=usage.get("requests", 0),
                   prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
                   seconds=record.get("seconds"))
        rows.append(row)
    return rows


def write_tables(records: Sequence[dict[str, Any]], out: Path) -> None:
    """``explanations.json`` (every record) and ``explanations.csv`` (the flat rows)."""
    write_text(out / "explanations.json", json.dumps(list(records), indent=1, allow_nan=False))
    rows = flat_rows(records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["latent"], lineterminator="\n")
    writer.writeheader()
    for row in rows:  # a cell starting with =, +, - or @ is text, not a formula, in a spreadsheet
        writer.writerow({k: ("'" + v if isinstance(v, str) and v[:1] in "=+-@" else v) for k, v in row.items()})
    write_text(out / "explanations.csv", buffer.getvalue())


def _mean_and_error(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def score_summary(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind ('sae', 'control'): latents explained, skipped, and each score's mean and standard
    error over the latents that have it."""
    summary: dict[str, dict[str, Any]] = {}
    for kind in sorted({r["kind"] for r in records}):
        mine = [r for r in records if r["kind"] == kind]
        entry: dict[str, Any] = {"latents": len(mine), "explained": sum(bool(r.get("explanation")) for r in mine),
                                 "skipped": sum(bool(r.get("skipped")) for r in mine)}
        for column, scorer, key in SCORE_COLUMNS:
            values = [r["scores"][scorer][key] for r in mine
                      if r.get("scores", {}).get(scorer, {}).get(key) is not None]
            mean, error = _mean_and_error(values)
            entry[column] = {"mean": mean, "stderr": error, "n": len(values)}
        entry["seconds_per_latent"] = sum(r.get("seconds") or 0 for r in mine) / max(1, entry["explained"])
        tokens = sum(r.get("usage", {}).get("prompt_tokens", 0) + r.get("usage", {}).get("completion_tokens", 0)
                     for r in mine)
        entry["tokens_per_latent"] = tokens / max(1, entry["explained"])
        summary[kind] = entry
    return summary


def _jsonl_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as sink:
        sink.write(text)
    tmp.replace(path)


def write_neuronpedia(records: Sequence[dict[str, Any]], examples: LatentExamples, token_strings: Sequence[str],
                      out: Path, *, model_id: str, source_id: str, explainer: str) -> Path:
    """``out/<model_id>/<source_id>/{features,activations,explanations}/batch-0.jsonl.gz`` for the
    SAE's latents (controls are ours, not the SAE's, and stay out). Returns the source folder."""
    folder = out / model_id / source_id
    features, activations, explanations = [], [], []
    density = examples.density
    for record in records:
        if record["kind"] != "sae":
            continue
        latent = int(record["latent"])
        index = str(latent)
        features.append({"modelId": model_id, "layer": source_id, "index": index,
                         "maxActApprox": float(examples.top_values[latent, 0]),
                         "frac_nonzero": float(density[latent])})
        for tokens, acts in zip(examples.top_tokens[latent], examples.top_acts[latent]):
            keep = tokens != PAD_TOKEN
            if not bool(keep.any()) or not float(acts.max()) > 0:
                continue
            values = [round(float(a), 5) for a in acts[keep]]
            peak = max(range(len(values)), key=values.__getitem__)
            activations.append({"modelId": model_id, "layer": source_id, "index": index,
                                "tokens": [token_strings[int(t)] for t in tokens[keep]], "values": values,
                                "maxValue": values[peak], "maxValueTokenIndex": peak, "minValue": min(values)})
        if record.get("explanation"):
            scores = {column: record["scores"][scorer].get(key) for column, scorer, key in SCORE_COLUMNS
                      if scorer in record.get("scores", {})}
            explanations.append({"modelId": model_id, "layer": source_id, "index": index,
                                 "description": record["explanation"], "explanationModelName": explainer,
                                 "typeName": "jumpscope-autointerp", "scores": scores})
    for name, rows in (("features", features), ("activations", activations), ("explanations", explanations)):
        _jsonl_gz(folder / name / "batch-0.jsonl.gz", rows)
    return folder
