"""A real headless Chromium (Debian's ``chromium``) driven over the DevTools protocol.

The protocol runs over ``--remote-debugging-pipe`` (the browser reads commands on fd 3 and
writes on fd 4, NUL-terminated JSON): no debugging port is opened. Chromium runs as
``nobody`` with its sandbox on (as root it would need ``--no-sandbox``), in its own process
group, which ``close`` ends by that group's id.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from brick.wait import wait_until

CHROMIUM = "/usr/bin/chromium"


class BrowserError(Exception):
    pass


class Browser:
    def __init__(self, width: int = 1200, height: int = 800) -> None:
        if not os.path.exists(CHROMIUM):
            raise BrowserError(f"{CHROMIUM} is missing: tools/setup.sh installs Debian's chromium")
        self.profile = Path(tempfile.mkdtemp(prefix="vmt-chromium-"))
        nobody = pwd.getpwnam("nobody")
        os.chown(self.profile, nobody.pw_uid, nobody.pw_gid)
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        argv = [
            "setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
            CHROMIUM, "--headless", "--remote-debugging-pipe", "--disable-gpu",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-sync", "--metrics-recording-only",
            f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"HOME": str(self.profile), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            start_new_session=True,
            preexec_fn=lambda: _place_fds(to_browser_r, from_browser_w),
            pass_fds=(3, 4),  # kept open after preexec_fn placed the pipes there
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    # -- protocol ------------------------------------------------------------------------------
    def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 15.0,
             session: bool = True) -> dict[str, Any]:  # fmt: skip
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline, method)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return dict(answer.get("result", {}))
            self.events.append(answer)

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise BrowserError(f"no answer to {what} (chromium rc {self.proc.poll()})")
            ready, _, _ = select.select([self._from_browser], [], [], 0.2)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError("chromium closed its DevTools pipe")
                self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(raw))

    # -- a page --------------------------------------------------------------------------------
    def open(self, url: str) -> None:
        """A new tab on ``url``, with its network requests recorded in ``events``."""
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True},
            session=False,
        )  # fmt: skip
        self.session = attached["sessionId"]
        self.call("Network.enable")
        self.call("Page.enable")
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        return wait_until(
            lambda: self.evaluate(expression), timeout_s=timeout, what=expression,
            max_interval_s=0.1,
        )  # fmt: skip

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(data["data"]))

    def request_urls(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("Browser.close", session=False, timeout=5)
                self.proc.wait(timeout=10)
        except (BrowserError, OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            else:  # the browser's helpers (zygote, renderers) share its process group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            os.close(self._to_browser)
            os.close(self._from_browser)
            shutil.rmtree(self.profile, ignore_errors=True)


def _place_fds(read_end: int, write_end: int) -> None:
    """In the child: the command pipe on fd 3, the answer pipe on fd 4."""
    read_copy, write_copy = os.dup(read_end), os.dup(write_end)
    os.dup2(read_copy, 3, inheritable=True)
    os.dup2(write_copy, 4, inheritable=True)
