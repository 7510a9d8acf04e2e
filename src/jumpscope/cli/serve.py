"""``jumpscope serve``: serve a dashboard folder over HTTP (a convenience: the dashboard also opens
straight from the file system)."""

from __future__ import annotations

import argparse
import functools
import os
import urllib.parse
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .common import command


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves the files under its folder only, without logging every request to stderr. A path
    with a null byte, a backslash or a '..' segment (raw or %-encoded) is answered 400; one that
    leads out of the folder through a symlink, 404."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass

    def send_head(self):  # type: ignore[no-untyped-def]  (the base class's signature)
        try:
            if bad_request_path(self.path):
                self.send_error(HTTPStatus.BAD_REQUEST, "Bad request path")
                return None
            root = os.path.realpath(self.directory)
            target = os.path.realpath(self.translate_path(self.path))
            if target != root and not target.startswith(root + os.sep):
                self.send_error(HTTPStatus.NOT_FOUND, "File not found")
                return None
            return super().send_head()
        except (ValueError, OSError):  # whatever else slipped through: an answer, not a traceback
            self.send_error(HTTPStatus.BAD_REQUEST, "Bad request path")
            return None


def bad_request_path(raw: str) -> bool:
    """Whether a request target is one no file under the folder can have: not starting with '/',
    or holding a null byte, a backslash or a '..' segment once %-decoded."""
    path = raw.split("?", 1)[0].split("#", 1)[0]  # as translate_path reads it
    decoded = urllib.parse.unquote(path, errors="surrogateescape")
    return (not path.startswith("/") or "\x00" in decoded or "\\" in decoded
            or ".." in decoded.split("/") or any(ord(c) < 32 for c in decoded))


def make_server(folder: str | Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for the files under ``folder``; port 0 picks a free one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no dashboard at {folder}: no such folder")
    if not (folder / "index.html").is_file():
        raise FileNotFoundError(f"{folder} has no index.html: is it a folder written by `jumpscope dashboard`?")
    return ThreadingHTTPServer((host, port), functools.partial(QuietHandler, directory=str(folder)))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a dashboard folder (the one holding index.html)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 exposes the dashboard to the network)")


@command("serve", "Serve a dashboard folder over HTTP until Ctrl-C.", add_serve_arguments)
def serve(args: argparse.Namespace) -> int:
    server = make_server(args.folder, args.host, args.port)
    host, port = server.server_address[:2]
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    print(f"serving {args.folder} at http://{shown}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
    return 0
