"""`jumpscope autointerp` end to end: a local tiny random chat model offline, and a real
chat-completions server on the loopback interface that fails on purpose (429, 500, malformed JSON,
timeouts) and answers a constant: nothing is lost, the scores are what a constant answer earns,
a re-run makes no request, and the dashboard shows the explanations."""

import csv
import gzip
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import jumpscope
from jumpscope.cli import main
from jumpscope.sae import build
from tiny_causal_lm import write_corpus, write_tiny_causal_lm

SITE = "layers.1.resid_post"
EXPLANATION = "words with the letter e"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("autointerp")
    model_path = write_tiny_causal_lm(root / "model", seq_len=4096)  # the explainer's prompts are long
    corpus = write_corpus(root / "corpus.txt")
    d = 32
    sae = build("relu", d_in=d, d_sae=24, site=SITE, model=str(model_path))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random directions, thresholds so latents fire at different rates
        sae.W_enc.copy_(torch.randn(d, 24, generator=g))
        sae.b_enc.copy_(-torch.linspace(20.0, 80.0, 24))  # pre-activations have std ~40 here
    jumpscope.save(sae, root / "sae", format="native")
    return root, corpus, model_path


def run(root, corpus, out, *args):
    return main(["autointerp", str(root / "sae"), "--corpus", str(corpus), "--txt-split", "paragraph",
                 "--context-size", "32", "--model-batch-size", "4", "--tokens", "1500", "--n-explain", "6",
                 "--n-score", "4", "--explainer-max-tokens", "8", "--device", "cpu", "--no-progress",
                 "--out", str(out), *args])


def test_a_local_tiny_chat_model_runs_the_whole_pipeline_offline(setup, capsys):
    root, corpus, model_path = setup
    out = root / "local"
    assert run(root, corpus, out, "--llm", str(model_path), "--max-latents", "3", "--controls", "2",
               "--simulation-contexts", "2") == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["kind"], r["latent"]) for r in records) == [("control", 0), ("control", 1), ("sae", 0),
                                                                  ("sae", 1), ("sae", 2)]
    for record in records:  # a random model writes nonsense, but every request was made and counted
        assert record.get("skipped") or record["usage"]["requests"] >= 1
        assert record.get("skipped") or record["usage"]["completion_tokens"] >= 1
    rows = list(csv.DictReader((out / "explanations.csv").open()))
    assert len(rows) == 5 and {"detection", "fuzzing", "simulation", "explanation"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["scores"]) == {"sae", "control"} and summary["explainer"].startswith("transformers:")
    assert "autointerp: 5 latents (2 controls)" in capsys.readouterr().err
    cached = summary["cache"]["misses"]
    # a second run answers every request from the cache
    assert run(root, corpus, out, "--llm", str(model_path), "--max-latents", "3", "--controls", "2",
               "--simulation-contexts", "2") == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["cache"]["misses"] == 0 and again["cache"]["hits"] >= cached > 0


class ConstantServer:
    """Chat completions on 127.0.0.1: an explanation request gets EXPLANATION, a detection or
    fuzzing request a list of 1s of the length it asks for, a simulation request an unusable
    reply; the first attempt of every third distinct request fails (429, 500, malformed JSON or
    a sleep past the client's timeout, in turn)."""

    FAULTS = ("429", "500", "malformed", "sleep")

    def __init__(self):
        self.requests, self.attempts, self.lock = 0, {}, threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, data = server.answer(body)
                try:
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, body):
        user = body["messages"][-1]["content"]
        with self.lock:
            self.requests += 1
            key = json.dumps(body, sort_keys=True)
            attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
            distinct = len(self.attempts)
        if attempt == 1 and distinct % 3 == 0:
            fault = self.FAULTS[(distinct // 3) % len(self.FAULTS)]
            if fault == "sleep":
                time.sleep(0.6)
            elif fault == "malformed":
                return 200, b'{"choices": [{"message": '
            else:
                return int(fault), b'{"error": {"message": "try again"}}'
        wanted = re.search(r"exactly (\d+) integers", user)
        text = json.dumps([1] * int(wanted.group(1))) if wanted else \
            EXPLANATION if "have in common" in user else "I cannot tell."
        reply = {"choices": [{"message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": 5}}
        return 200, json.dumps(reply).encode()


@pytest.fixture
def constant_server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = ConstantServer()
    yield server
    server.httpd.shutdown()


def test_an_http_server_that_fails_on_purpose_loses_nothing_and_a_rerun_asks_nothing(setup, constant_server,
                                                                                  capsys):
    root, corpus, _ = setup
    site = root / "site"  # a dashboard first: autointerp reuses its examples and writes onto its pages
    assert main(["dashboard", str(root / "sae"), "--corpus", str(corpus), "--txt-split", "paragraph",
                 "--context-size", "32", "--model-batch-size", "4", "--tokens", "1500", "--out", str(site),
                 "--device", "cpu", "--no-progress"]) == 0
    out = root / "http"
    http = ["--examples", str(site), "--base-url", constant_server.url, "--llm", "test-model", "--timeout", "0.3",
            "--concurrency", "3", "--max-latents", "6", "--controls", "2", "--simulation-contexts", "2"]
    assert run(root, corpus, out, *http, "--dry-run") == 0
    assert not (out / "results.jsonl").exists() and constant_server.requests == 0  # a dry run asks nothing
    assert run(root, corpus, out, *http) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 8 and sum(r["kind"] == "control" for r in records) == 2
    assert any(r["scores"].get("detection", {}).get("tnr") == 0.0 for r in records)  # negatives were shown
    retried = constant_server.requests - len(constant_server.attempts)
    assert retried >= 3  # faults were met and retried
    for record in records:
        if record.get("skipped"):
            continue
        assert record["explanation"] == EXPLANATION
        # a constant "all activate" answer: every positive right, every negative wrong
        for scorer in ("detection", "fuzzing"):
            score = record["scores"][scorer]
            assert score["failed"] == 0 and score["tpr"] == 1.0 and score["tnr"] in (0.0, None)
            assert score["accuracy"] == (0.5 if score["tnr"] == 0.0 else None)
        simulation = record["scores"]["simulation"]  # unusable replies: counted, not fatal
        assert simulation["correlation"] is None and simulation["failed"] >= 1 and simulation["n_contexts"] == 0
    def table():
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((out / "explanations.csv").open())]

    first = table()
    # a re-run, and a resume after a torn last line, make no request at all
    before = constant_server.requests
    assert run(root, corpus, out, *http) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    assert run(root, corpus, out, *http, "--resume") == 0
    assert constant_server.requests == before
    assert table() == first and len(first) == 8
    # the dashboard's pages now carry the SAE latents' explanations (not the controls')
    shown = (site / "data" / "explanations.js").read_text()
    assert shown.startswith("jumpscopeExplanations(") and EXPLANATION in shown
    assert len(json.loads(shown[len("jumpscopeExplanations("):-3])) == sum(r["kind"] == "sae" for r in records)
    # and Neuronpedia's layout holds the SAE's latents
    folder = next((out / "neuronpedia").glob("*/*"))
    explained = [json.loads(line) for line in gzip.open(folder / "explanations" / "batch-0.jsonl.gz", "rt")]
    assert {e["description"] for e in explained} == {EXPLANATION}
    activations = [json.loads(line) for line in gzip.open(folder / "activations" / "batch-0.jsonl.gz", "rt")]
    assert activations and all(len(a["tokens"]) == len(a["values"]) for a in activations)
    assert all(a["values"][a["maxValueTokenIndex"]] == a["maxValue"] for a in activations)
    capsys.readouterr()


def test_bad_autointerp_options_are_one_line_errors(setup, tmp_path, capsys):
    root, corpus, _ = setup
    assert run(root, corpus, tmp_path / "a", "--latents", "99", "--base-url", "http://127.0.0.1:9/v1") == 2
    assert "latent 99 is out of range" in capsys.readouterr().err
    assert run(root, corpus, tmp_path / "b", "--base-url", "ftp://example") == 2
    assert "ftp://example" in capsys.readouterr().err
    assert run(root, corpus, tmp_path / "c", "--examples", str(tmp_path)) == 2
    assert "holds no examples" in capsys.readouterr().err
    assert run(root, corpus, tmp_path / "d", "--scorers", "vibes") == 2
