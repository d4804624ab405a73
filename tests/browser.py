"""A headless Chromium driven over the DevTools protocol, for the dashboard's browser test and benchmark.

Uses Debian's `chromium` in its own headless mode (no browser download), through `--remote-debugging-pipe`
(JSON messages on file descriptors 3 and 4, so no websocket client is needed).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WAIT_S = 20.0
WIDTH, HEIGHT = 1440, 2300
# dup() first: the new fds are the lowest free ones, so moving them onto 3 and 4 never clobbers the other.
_LAUNCHER = ("import os, sys; r, w = os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2])); os.dup2(r, 3); "
             "os.dup2(w, 4); os.set_inheritable(3, True); os.set_inheritable(4, True); "
             "os.execvp(sys.argv[3], sys.argv[3:])")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """A headless Chromium and one page, over the DevTools protocol on a pipe."""

    def __init__(self, profile: Path, chromium: str, *extra_flags: str) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--hide-scrollbars", "--no-first-run", "--disable-extensions", "--remote-debugging-pipe",
                 f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", *extra_flags]
        # The protocol expects its pipe on fds 3 (commands in) and 4 (replies out); a launcher puts it there.
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(to_browser_r), str(from_browser_w),
                                      chromium, *flags, "about:blank"],
                                     pass_fds=(to_browser_r, from_browser_w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._buffer = b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=WIDTH, height=HEIGHT,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], WAIT_S)
            chunk = os.read(self._from_browser, 1 << 16) if ready else b""
            if not chunk:
                raise RuntimeError("the browser stopped answering")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(raw))

    def open(self, url: str) -> None:
        """A fresh document (about:blank first: a URL differing only in its fragment would not reload)."""
        self.call("Page.navigate", session=True, url="about:blank")
        self.wait_for("location.href === 'about:blank'")
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("location.href !== 'about:blank' && document.readyState !== 'loading'")

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def js_await(self, expression: str) -> Any:
        """Evaluate an expression that may be a promise (e.g. a dynamic `import()`), and return its value."""
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except RuntimeError:  # e.g. the document is still being replaced
                value = None
            if value:
                return value
            time.sleep(0.1)
        state = self.js("document.getElementById('notice') && document.getElementById('notice').textContent")
        raise AssertionError(f"timed out waiting for {expression!r}; page notice: {state!r}")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except RuntimeError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_browser)
        os.close(self._from_browser)
