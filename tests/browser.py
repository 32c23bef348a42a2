"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages ending in NUL on file descriptors 3 and 4), so the browser tests need no Python package
beyond the standard library. `chromium()` is None where no Chromium is installed (the tests skip).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


class Browser:
    """One headless Chromium; `open(url)` gives a Page. Use as a context manager."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 60.0):
        exe = chromium()
        if exe is None:
            raise RuntimeError("no chromium / chrome installed")
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        read_end, self._to_chrome = os.pipe()
        self._from_chrome, write_end = os.pipe()
        # above 9, so that moving them onto 3 and 4 cannot overwrite one with the other
        to_chrome_r, from_chrome_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (read_end, write_end))
        os.close(read_end)
        os.close(write_end)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-pipe",
                "--no-first-run", "--disable-extensions",
                f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}", "about:blank"]
        # Chromium reads commands on fd 3 and answers on fd 4: bash moves the pipe ends there, so no
        # Python runs between fork and exec (JAX's threads make that unsafe)
        moves = f"3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-"
        self.proc = subprocess.Popen([shutil.which("bash") or "/bin/bash", "-c", f'exec "$0" "$@" {moves}', exe, *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     pass_fds=(to_chrome_r, from_chrome_w))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id, self._buffer, self.events = 0, b"", []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        self._profile.cleanup()

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Sends one command and waits for its answer (events that arrive meanwhile are kept)."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                self.events.append(reply)
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError(f"no answer from chromium to {method}")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self._buffer += chunk

    def open(self, url: str) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.goto(url)
        return page


class Page:
    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, self.session)

    def goto(self, url: str, timeout: float = 60.0) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", timeout)

    def eval(self, expression: str):
        """The value of a JavaScript expression (promises awaited); a thrown error raises here."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.eval(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for {expression}")
            time.sleep(0.1)

    def screenshot(self, path, full_page: bool = True) -> Path:
        params = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            w, h = self.eval("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": w, "height": min(h, 8000), "scale": 1}
        data = self.send("Page.captureScreenshot", params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


# every <img> with a src has finished loading and decoded to a non-empty picture
IMAGES_LOADED = ("Array.from(document.images).filter(i => i.getAttribute('src'))"
                 ".every(i => i.complete && i.naturalWidth > 0)")
BROKEN_IMAGES = ("Array.from(document.images).filter(i => i.getAttribute('src') && "
                 "!(i.complete && i.naturalWidth > 0)).map(i => i.alt)")


def check_report_page(path, screenshot=None) -> dict:
    """Opens a report in headless Chromium and checks what a reader relies on: every image loads,
    and each slider, moved to its last and then its middle position, shows that frame of its row.
    Returns {"images": n, "sliders": n}; saves a full-page screenshot if asked."""
    with Browser() as browser:
        page = browser.open(Path(path).resolve().as_uri())
        assert page.eval(IMAGES_LOADED), page.eval(BROKEN_IMAGES)
        sliders = page.eval("document.querySelectorAll('.slider').length")
        for k in range(sliders):
            moved = page.eval(f"""(() => {{
                const s = document.querySelectorAll('.slider')[{k}], input = s.querySelector('input');
                const frames = Array.from(document.getElementById(s.dataset.frames).querySelectorAll('img'));
                const view = s.querySelector('img.frame'), out = [];
                for (const i of [frames.length - 1, Math.floor((frames.length - 1) / 2)]) {{
                    input.value = i; input.dispatchEvent(new Event('input'));
                    out.push(view.src === frames[i].src && view.dataset.index === String(i));
                }}
                return out; }})()""")
            assert all(moved), f"slider {k} does not show the frame it points at"
        if screenshot is not None:
            page.screenshot(screenshot)
        return {"images": page.eval("document.images.length"), "sliders": sliders}
