"""A headless Chromium (Debian's package) driven over the Chrome DevTools Protocol through a pipe
(`--remote-debugging-pipe`: JSON messages, NUL-terminated, on file descriptors 3 and 4), so the tests need no
driver package and no browser download. One browser per test module; a tab per page."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# The flags that work on these machines (no sandbox in a container, no GPU, nothing fetched in the background).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]
WAIT_S = 120.0  # a guard against a hung browser, not a timing assertion


def find_chromium() -> str | None:
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")


class Chromium:
    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="pkv-chromium-")
        to_browser, from_browser = os.pipe(), os.pipe()
        high = [os.dup(fd) for fd in (to_browser[0], from_browser[1])]  # dup2'd onto 3 and 4 in the child

        def child() -> None:  # dup2 makes 3 and 4 inheritable; every other descriptor of ours is not (PEP 446)
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        # close_fds=False: closing happens after preexec_fn and would close 3 and 4 again; pass_fds cannot name
        # descriptors that exist only in the child.
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=child, close_fds=False)
        for fd in (*high, to_browser[0], from_browser[1]):
            os.close(fd)
        self.out, self.inp = to_browser[1], from_browser[0]
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:  # already gone: nothing to close
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.out, self.inp):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _read(self) -> dict:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.inp], [], [], WAIT_S)
            if not ready:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self.inp, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (code {self.proc.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str) -> dict:
        for k, event in enumerate(self.events):
            if event.get("method") == method and event.get("sessionId") == session:
                return self.events.pop(k)
        while True:
            event = self._read()
            if event.get("method") == method and event.get("sessionId") == session:
                return event
            self.events.append(event)

    def open(self, path: Path, width: int = 1280, height: int = 1000) -> Tab:
        """A new tab with the file loaded (after its load event), console and log recorded from the start."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1,
                  mobile=False)
        self.send("Page.navigate", session, url=Path(path).resolve().as_uri())
        self.wait_event("Page.loadEventFired", session)
        return Tab(self, session)


class Tab:
    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def eval(self, expression: str):
        """The value of a JavaScript expression (JSON-serialisable); an exception in it fails the test."""
        reply = self.browser.send("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (a blocked fetch, a CSP violation) so far."""
        self.eval("0")  # drain what the page logged before this point
        out = []
        for e in self.browser.events:
            if e.get("sessionId") != self.session:
                continue
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails", {}))[:300])
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(json.dumps(p.get("args", []))[:300])
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                out.append(p["entry"].get("text", "")[:300])
        return out

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.browser.send("Page.captureScreenshot", self.session, format="png")["data"])
        Path(path).write_bytes(data)
        return data
