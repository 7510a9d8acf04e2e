"""``jumpscope serve``: serve a dashboard folder over HTTP (a convenience: the dashboard also opens
straight from the file system)."""

from __future__ import annotations

import argparse
import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .cli import command


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without logging every request to stderr."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


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
