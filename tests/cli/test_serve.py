"""``jumpscope serve``: hostile request paths get a 4xx answer, never a traceback or a file
outside the folder."""

from __future__ import annotations

import http.client
import threading

import pytest

from jumpscope.cli.serve import bad_request_path, make_server


@pytest.fixture
def server(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html>dashboard</html>")
    (tmp_path / "secret.txt").write_text("secret")
    (site / "escape.txt").symlink_to(tmp_path / "secret.txt")
    server = make_server(site, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path, status", [
    ("/index.html%00.txt", 400), ("/%00", 400), ("/../secret.txt", 400), ("/%2e%2e/secret.txt", 400),
    ("/a/%2E%2E/%2e%2e/secret.txt", 400), ("/..%5csecret.txt", 400), ("index.html", 400),
    ("/escape.txt", 404),  # a symlink out of the folder
])
def test_hostile_paths_are_refused_without_a_traceback(server, capsys, path, status):
    code, body = get(server, path)
    assert code == status
    assert b"secret" not in body
    assert "Traceback" not in capsys.readouterr().err
    assert get(server, "/index.html") == (200, b"<html>dashboard</html>")  # the server still answers


def test_bad_request_path():
    assert bad_request_path("/x%00") and bad_request_path("/x/../y") and bad_request_path("/%2e%2e")
    assert not bad_request_path("/index.html") and not bad_request_path("/data/a.json?v=1")
