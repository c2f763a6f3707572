"""Load a page in headless Chromium and report its broken images and console errors.

Talks the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (file descriptors 3 and 4,
NUL-separated JSON), so it needs no WebSocket client and no network port.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")

# Every <img> that did not decode (missing file, not an image) or is not loaded yet.
_BROKEN_IMAGES = """JSON.stringify(Array.from(document.images)
  .filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src')))"""


def find_chromium() -> str | None:
    """The path of a Chromium or Chrome binary on PATH, or None."""
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


@dataclass
class PageCheck:
    """What loading the page showed: ``broken_images`` (their src), ``errors`` (console errors,
    uncaught exceptions, failed resource loads), the number of images and of tables, and the values
    of the ``expressions`` given to :func:`check_page`."""

    broken_images: list[str]
    errors: list[str]
    n_images: int
    n_tables: int
    screenshot: bytes = field(default=b"", repr=False)
    values: list = field(default_factory=list)


class _Pipe:
    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.w, self.r = proc, write_fd, read_fd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for k, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(k)
        while True:
            m = self._read_message(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)


def check_page(page: Path, chromium: str, screenshot: bool = False, width: int = 1280, height: int = 900,
               expressions: tuple[str, ...] = ()) -> PageCheck:
    """Open ``page`` (a local HTML file) in headless Chromium with a ``width`` x ``height`` viewport
    and collect broken images and errors, and the value of each JavaScript ``expression`` (JSON-able).

    Raises:
        RuntimeError / TimeoutError: Chromium did not start or did not answer.
    """
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()
    profile = tempfile.mkdtemp(prefix="maxact-chromium-")

    def child_fds():  # Chromium reads commands on fd 3 and writes answers on fd 4
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]
        os.dup2(high[0], 3)  # dup2 makes them inheritable; every other fd is close-on-exec
        os.dup2(high[1], 4)

    proc = subprocess.Popen(
        [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-pipe", "--no-first-run",
         f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=child_fds, close_fds=False,
    )
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(proc, to_chrome_w, from_chrome_r)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.send(f"{domain}.enable", session=sid)
        pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=sid)
        pipe.send("Page.navigate", {"url": Path(page).resolve().as_uri()}, session=sid)
        pipe.wait_event("Page.loadEventFired")
        values = [pipe.send("Runtime.evaluate", {"expression": e, "returnByValue": True}, session=sid)["result"]
                  .get("value") for e in expressions]
        result = pipe.send("Runtime.evaluate", {"expression": _BROKEN_IMAGES, "returnByValue": True}, session=sid)
        broken = json.loads(result["result"]["value"])
        counts = pipe.send("Runtime.evaluate", {"expression": "[document.images.length, "
                           "document.querySelectorAll('table').length]", "returnByValue": True}, session=sid)
        n_images, n_tables = counts["result"]["value"]
        shot = b""
        if screenshot:
            import base64

            h = pipe.send("Runtime.evaluate", {"expression": "document.documentElement.scrollHeight",
                                               "returnByValue": True}, session=sid)["result"]["value"]
            pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": int(h), "deviceScaleFactor": 1,
                                                             "mobile": False}, session=sid)
            shot = base64.b64decode(pipe.send("Page.captureScreenshot", {"format": "png"}, session=sid)["data"])
        pipe.send("Runtime.evaluate", {"expression": "1"}, session=sid)  # drain events queued before now
        errors = []
        for e in pipe.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                errors.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
            elif m == "Network.loadingFailed":
                errors.append(f"load failed: {p.get('errorText')}")
        return PageCheck(broken, errors, int(n_images), int(n_tables), shot, values)
    finally:
        try:
            pipe.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        shutil.rmtree(profile, ignore_errors=True)
