"""A minimal Chrome DevTools Protocol client over --remote-debugging-pipe, for real-browser tests
without extra Python dependencies.

Chromium reads commands from fd 3 and writes replies and events to fd 4, each message JSON ended
by a NUL byte. Every wait has a deadline, so a hung browser fails the test instead of hanging it.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import tempfile
import time
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """Path of a Chromium-family browser on PATH (or Debian's /usr/bin/chromium), else None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page (a flattened CDP session). Use as a context manager."""

    def __init__(self, binary: str, timeout: float = 15.0):
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []  # every event seen, in order
        self._buffer = b""
        self._next_id = 0
        self._profile = tempfile.mkdtemp(prefix="jumpscope-chromium-")
        command_read, self._command_write = os.pipe()
        self._event_read, event_write = os.pipe()
        # posix_spawn's dup2 actions put the pipe ends on fds 3 and 4 in the child (Popen's
        # pass_fds keeps fd numbers and cannot move them); first moved to fds >= 5 so that neither
        # dup2 overwrites the other's source.
        child_in, child_out = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for fd in (command_read, event_write))
        for fd in (command_read, event_write):
            os.close(fd)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--mute-audio", f"--user-data-dir={self._profile}",
                 "--remote-debugging-pipe", "about:blank"]
        actions = [(os.POSIX_SPAWN_DUP2, child_in, 3), (os.POSIX_SPAWN_DUP2, child_out, 4),
                   (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
        try:  # setsid: its own process group, so close() kills its helper processes too
            self.pid = os.posix_spawn(binary, [binary, *flags], os.environ, file_actions=actions, setsid=True)
        finally:
            os.close(child_in)
            os.close(child_out)
        self.session: str | None = None

    def __enter__(self) -> "Browser":
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                     session=False)["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                self.call(f"{domain}.enable")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the browser's process group, reap it and remove its profile folder."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                break
            time.sleep(0.02)
        for fd in (self._command_write, self._event_read):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def exited(self) -> bool:
        """Whether the browser process has ended."""
        try:
            return os.waitpid(self.pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            return True

    # -- protocol ---------------------------------------------------------------------------------
    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> dict[str, Any]:
        """Send one command (to the page's session unless session=False) and return its result."""
        message_id = self._send(method, params, self.session if session else None)
        reply = self._read_until(lambda m: m.get("id") == message_id, f"a reply to {method}")
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def _send(self, method: str, params: dict[str, Any] | None, session: str | None) -> int:
        """Write one command; replies nobody waits for are dropped by _read_until."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = memoryview(json.dumps(message).encode() + b"\0")
        while data:  # a pipe may take a long message in several writes
            data = data[os.write(self._command_write, data):]
        return self._next_id

    def wait_event(self, method: str, since: int = 0) -> dict[str, Any]:
        """The first event ``method`` at index >= ``since`` of self.events, waiting for it."""
        for event in self.events[since:]:
            if event.get("method") == method:
                return event
        return self._read_until(lambda m: m.get("method") == method, f"event {method}")

    def _read_until(self, wanted, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                    if message["method"] == "Page.javascriptDialogOpening":  # never leave a page blocked
                        self._send("Page.handleJavaScriptDialog", {"accept": True}, message.get("sessionId"))
                if wanted(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"timed out after {self.timeout:.0f} s waiting for {what}")
            ready, _, _ = select.select([self._event_read], [], [], left)
            if ready:
                chunk = os.read(self._event_read, 1 << 20)
                if not chunk:
                    raise BrowserError(f"the browser closed its pipe while waiting for {what}")
                self._buffer += chunk

    # -- page helpers -----------------------------------------------------------------------------
    def add_init_script(self, source: str) -> None:
        """Run ``source`` in every document before its own scripts."""
        self.call("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    def navigate(self, url: str) -> None:
        """Load ``url`` and wait for its load event."""
        since = len(self.events)
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url} failed: {result['errorText']}")
        self.wait_event("Page.loadEventFired", since)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page (an exception in it raises BrowserError)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self, since: int = 0) -> list[str]:
        """Uncaught exceptions, console.error calls and error log entries seen since event ``since``."""
        errors = []
        for event in self.events[since:]:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append("console.error: " + " ".join(str(arg.get("value", arg.get("description")))
                                                           for arg in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
        return errors

    def dialogs(self, since: int = 0) -> list[str]:
        """Messages of the JavaScript dialogs (alert, confirm, prompt) opened since event ``since``."""
        return [event["params"].get("message", "") for event in self.events[since:]
                if event.get("method") == "Page.javascriptDialogOpening"]
