"""A small Chrome DevTools Protocol client over `websockets`, for Debian's `chromium`.

`Chromium` starts the browser headless as a plain subprocess (so a module-scoped, synchronous
fixture can own it) and reads the DevTools address it prints. `cdp_session()` connects to
it from a test's own event loop and opens one tab (`Page`) with its own target session.
Waiting is event-driven: `Page.wait_for` resolves a promise in the page from a
MutationObserver, never a sleep loop.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

#: Flags for a quiet headless browser running as root in a container.
_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-sync", "--metrics-recording-only",
    "--password-store=basic", "--use-mock-keychain", "--mute-audio",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--window-size=1280,900", "--remote-debugging-port=0", "--remote-allow-origins=*",
)


class CdpError(RuntimeError):
    """A DevTools command failed, or the page threw."""


def find_chromium() -> str | None:
    """Debian's chromium (or `LUKHAS_CHROMIUM`), or None when it is not installed."""
    explicit = os.environ.get("LUKHAS_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """A headless chromium process; `ws_url` is its browser-level DevTools endpoint."""

    def __init__(self, binary: str, *, timeout: float = 30.0) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="lukhas-chromium-")
        self.proc = subprocess.Popen(
            [binary, *_FLAGS, f"--user-data-dir={self._profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        found: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, args=(found,), daemon=True)
        self._reader.start()
        try:
            url = found.get(timeout=timeout)
        except queue.Empty:
            url = None
        if url is None:
            self.close()
            raise CdpError(
                f"chromium printed no DevTools address in {timeout}s "
                f"(exit {self.proc.poll()}): {self.log[-15:]}"
            )
        self.ws_url = url

    def _pump(self, found: queue.Queue[str | None]) -> None:
        assert self.proc.stderr is not None
        announced = False
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            if not announced and line.startswith("DevTools listening on "):
                announced = True
                found.put(line.removeprefix("DevTools listening on ").strip())
        if not announced:
            found.put(None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self._profile.cleanup()


class Connection:
    """One websocket to the browser; commands by id, events per target session."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[str, asyncio.Queue[dict[str, Any]]] = {}

    async def read(self) -> None:
        async for raw in self._ws:
            message = json.loads(raw)
            if "id" in message:
                future = self._pending.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
            else:
                events = self._events.get(message.get("sessionId", ""))
                if events is not None:
                    events.put_nowait(message)

    def events(self, session_id: str) -> asyncio.Queue[dict[str, Any]]:
        return self._events.setdefault(session_id, asyncio.Queue())

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, session_id: str | None = None,
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        future = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._ws.send(json.dumps(message))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        return reply.get("result", {})


class Page:
    """One tab, driven through its target session."""

    def __init__(self, conn: Connection, session_id: str, target_id: str) -> None:
        self.conn = conn
        self.session_id = session_id
        self.target_id = target_id

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.conn.send(method, params, session_id=self.session_id)

    async def goto(self, url: str, *, timeout: float = 20.0) -> None:
        events = self.conn.events(self.session_id)
        while not events.empty():
            events.get_nowait()
        await self.send("Page.navigate", {"url": url})
        async with asyncio.timeout(timeout):
            while (await events.get()).get("method") != "Page.loadEventFired":
                pass

    async def evaluate(self, expression: str, *, timeout: float = 20.0) -> Any:
        """The value of `expression` (promises awaited), run as a user gesture."""
        result = await self.conn.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True,
             "userGesture": True},
            session_id=self.session_id, timeout=timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"the page threw: {text}")
        return result["result"].get("value")

    async def wait_for(self, condition: str, *, timeout: float = 15.0) -> Any:
        """Resolve once the JS expression `condition` is truthy, re-checked on DOM changes."""
        ms = int(timeout * 1000)
        script = f"""new Promise((resolve, reject) => {{
  const check = () => {{ try {{ return ({condition}); }} catch (e) {{ return null; }} }};
  const first = check();
  if (first) {{ resolve(first); return; }}
  const observer = new MutationObserver(() => {{
    const value = check();
    if (value) {{ observer.disconnect(); clearTimeout(timer); resolve(value); }}
  }});
  const timer = setTimeout(() => {{
    observer.disconnect();
    reject(new Error("timed out waiting for: " + {json.dumps(condition)} +
                     " | page says: " + document.body.innerText.slice(0, 800)));
  }}, {ms});
  observer.observe(document, {{subtree: true, childList: true, characterData: true,
                               attributes: true}});
}})"""
        return await self.evaluate(script, timeout=timeout + 5)

    async def click(self, selector: str) -> None:
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    async def fill(self, selector: str, value: str) -> None:
        await self.evaluate(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)}); "
            f"el.value = {json.dumps(value)}; el.dispatchEvent(new Event('input')); }})()"
        )

    async def text(self, selector: str) -> str:
        return str(await self.evaluate(
            f"document.querySelector({json.dumps(selector)}).textContent"
        ))

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        data = base64.b64decode(shot["data"])
        path.parent.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (tests: tiny, local)
        path.write_bytes(data)  # noqa: ASYNC240

    async def add_virtual_authenticator(self) -> str:
        """A platform passkey authenticator: CTAP2, internal, resident keys, user verification."""
        await self.send("WebAuthn.enable", {"enableUI": False})
        reply = await self.send("WebAuthn.addVirtualAuthenticator", {"options": {
            "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
            "hasUserVerification": True, "isUserVerified": True,
            "automaticPresenceSimulation": True,
        }})
        return str(reply["authenticatorId"])

    async def remove_virtual_authenticator(self, authenticator_id: str) -> None:
        await self.send("WebAuthn.removeVirtualAuthenticator",
                        {"authenticatorId": authenticator_id})

    async def credentials(self, authenticator_id: str) -> list[dict[str, Any]]:
        """The authenticator's credentials (CDP form: `credentialId` in standard base64)."""
        reply = await self.send("WebAuthn.getCredentials", {"authenticatorId": authenticator_id})
        return list(reply["credentials"])

    async def add_credential(self, authenticator_id: str, credential: dict[str, Any]) -> None:
        await self.send("WebAuthn.addCredential",
                        {"authenticatorId": authenticator_id, "credential": credential})


@asynccontextmanager
async def cdp_session(browser: Chromium) -> AsyncIterator[Browser]:
    """A DevTools connection to `browser` from this event loop, closed on exit."""
    async with connect(browser.ws_url, max_size=None) as ws:
        conn = Connection(ws)
        reader = asyncio.create_task(conn.read())
        try:
            yield Browser(conn)
        finally:
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                pass


class Browser:
    """Opens tabs; each gets its own browser context (no shared cookies) unless asked."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._pages: list[Page] = []

    async def new_page(self) -> Page:
        context = await self.conn.send("Target.createBrowserContext")
        target = await self.conn.send(
            "Target.createTarget",
            {"url": "about:blank", "browserContextId": context["browserContextId"]},
        )
        attached = await self.conn.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self.conn, attached["sessionId"], target["targetId"])
        page.conn.events(page.session_id)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        self._pages.append(page)
        return page
