"""The passkey page and the MATRIZ dashboard in real headless Chromium.

Each test opens its own browser context with Chromium's WebAuthn virtual authenticator
(CTAP2, internal, resident keys, user verification) and clicks through the page as a
person would; the assertions read the DOM. The stack behind it is real (see conftest.py).
The dashboard test runs first, so the counts it expects are exactly the calls it makes.
"""

from __future__ import annotations

import os
import secrets
import shutil

import httpx
import msgspec
import pytest

from bus import connect
from lukhas.observability.matriz_emit import make_node
from tests.browser._cdp import Chromium, Page, cdp_session
from tests.browser.conftest import README_SCREENSHOTS, SCREENSHOTS, Pages

pytestmark = pytest.mark.nats

VERIFY = "DECISION:identity:passkey.verify"
OPTIONS = "DECISION:identity:passkey.register.options"
DELETE = "DECISION:identity:passkey.delete"


async def _result(page: Page, action: str) -> tuple[str, str]:
    """Click `action`, wait for the page's final result line; return (text, refusal reason)."""
    await page.evaluate(
        "(() => { const r = document.querySelector('#result');"
        " r.textContent = ''; r.dataset.reason = ''; })()"
    )
    await page.click(action)
    text = await page.wait_for(
        "(() => { const t = document.querySelector('#result').textContent;"
        " return t && t !== '…' ? t : null; })()"
    )
    reason = await page.evaluate("document.querySelector('#result').dataset.reason")
    return str(text), str(reason or "")


async def _open(page: Page, url: str) -> None:
    await page.goto(url)
    await page.wait_for("document.readyState === 'complete' && !!window.PublicKeyCredential")


async def _register(page: Page, name: str) -> None:
    await page.fill("#user-name", name)
    text, reason = await _result(page, "#register")
    assert text.startswith(f"Passkey registered for {name}"), (text, reason)


async def _rows(page: Page, count: int) -> None:
    await page.wait_for(f"document.querySelectorAll('#passkeys tbody tr').length === {count}")


def _save(name: str) -> None:
    """Keep a test's screenshot for the README when asked (LUKHAS_UPDATE_SCREENSHOTS=1)."""
    if os.environ.get("LUKHAS_UPDATE_SCREENSHOTS") == "1":
        README_SCREENSHOTS.mkdir(exist_ok=True)
        shutil.copyfile(SCREENSHOTS / name, README_SCREENSHOTS / name)


async def test_dashboard_shows_the_calls_just_made_live(
    pages: Pages, chromium: Chromium
) -> None:
    name = f"dana-{secrets.token_hex(4)}"
    async with cdp_session(chromium) as browser:
        dashboard = await browser.new_page()
        await dashboard.goto(f"{pages.url}/dashboard")
        await dashboard.wait_for("document.querySelector('#connection').textContent === 'live'")
        await dashboard.wait_for("document.querySelectorAll('#points tbody tr[data-emit-point]')"
                                 ".length >= 6")

        page = await browser.new_page()
        await page.add_virtual_authenticator()
        await _open(page, pages.url)
        await _register(page, name)
        await page.fill("#user-name", name)
        text, _ = await _result(page, "#sign-in")
        assert text == f"Signed in as {name}.", text
        text, reason = await _result(page, "#replay")
        assert reason == "challenge_reused", text
        # Malformed assertions: refused by the service as invalid_assertion.
        statuses = await page.evaluate("""Promise.all(Array.from({length: 30}, () =>
            fetch('/api/verify', {method: 'POST', headers: {'Content-Type': 'application/json'},
                  body: JSON.stringify({credential: {id: 'x'}})}).then(r => r.status)))""")
        assert set(statuses) == {200}, statuses

        row = f"#points tr[data-emit-point='{VERIFY}']"
        # Two verifies through the page, then 30 malformed: 32 calls, 31 refused, 0 errors.
        await dashboard.wait_for(f"document.querySelector(\"{row} .count\").textContent === '32'")
        assert await dashboard.text(f"{row} .errors") == "0"
        assert await dashboard.text(f"{row} .refused") == "31"
        reasons = await dashboard.wait_for(
            f"(() => {{ const t = document.querySelector(\"{row} .reasons\").textContent;"
            " return t.includes('challenge_reused 1') ? t : null; })()"
        )
        assert reasons == "invalid_assertion 30, challenge_reused 1", reasons
        # The newest nodes, pseudonymized: register.options carried the user name.
        subject = await dashboard.wait_for(
            "(() => { const r = document.querySelector("
            f"\"#nodes tr[data-emit-point='{OPTIONS}']\");"
            " return r ? r.lastChild.title : null; })()"
        )
        assert subject and name not in subject
        assert name not in await dashboard.evaluate("document.body.innerText")
        await dashboard.wait_for(
            "document.querySelector(\"#nodes tr[data-outcome='refused'] .outcome\")"
            ".textContent === 'refused (invalid_assertion)'"
        )

        # A failing service (nodes as the slices user would publish them): the page alert
        # fires on the dashboard as the observability worker publishes it.
        async with connect(pages.auth.settings("slices")) as bus:
            for _ in range(30):
                node = make_node(
                    "DECISION", "identity:passkey.delete", outcome="error", latency_ms=1.0,
                    trace_id=secrets.token_hex(16), producer="browser-test",
                    capability="delete_passkey",
                )
                await bus.publish(node.subject, msgspec.json.encode(node))
            await bus.flush()
        alert = await dashboard.wait_for(
            "(() => { const li = [...document.querySelectorAll('#alerts li[data-state=firing]')]"
            ".find(li => li.textContent.includes(' page '));"
            " return li ? li.textContent : null; })()",
            timeout=20,
        )
        assert DELETE in alert, alert
        assert await dashboard.evaluate("document.querySelectorAll('#chart polyline').length") == 3
        await dashboard.send("Emulation.setDeviceMetricsOverride", {
            "width": 1280, "height": 1560, "deviceScaleFactor": 1, "mobile": False})
        await dashboard.screenshot(SCREENSHOTS / "dashboard.png")
        _save("dashboard.png")


def _b64url(standard: str) -> str:
    return standard.replace("+", "-").replace("/", "_").rstrip("=")


async def test_register_sign_in_add_list_and_delete_passkeys(
    pages: Pages, chromium: Chromium
) -> None:
    name = f"alice-{secrets.token_hex(4)}"
    async with cdp_session(chromium) as browser:
        page = await browser.new_page()
        laptop = await page.add_virtual_authenticator()
        await _open(page, pages.url)
        await _register(page, name)
        [first] = await page.credentials(laptop)

        # A second passkey without signing in first: refused, the reason shown.
        await page.fill("#user-name", name)
        text, reason = await _result(page, "#register")
        assert reason == "enrolment_grant_required", text

        await page.fill("#user-name", name)
        text, _ = await _result(page, "#sign-in")
        assert text == f"Signed in as {name}.", text
        await _rows(page, 1)
        assert await page.text("#account-name") == name

        # Signed in: the sign-in's enrolment grant (kept by the gateway) adds a passkey on
        # another device (the first one refuses a second credential for the same account).
        await page.remove_virtual_authenticator(laptop)
        phone = await page.add_virtual_authenticator()
        text, _ = await _result(page, "#add-passkey")
        assert text.startswith(f"Passkey registered for {name}"), text
        await _rows(page, 2)
        assert await page.evaluate("document.querySelector('#add-passkey').disabled") is True
        await page.screenshot(SCREENSHOTS / "passkeys.png")
        _save("passkeys.png")

        # Delete the laptop's passkey from the list.
        gone = _b64url(first["credentialId"])
        text, _ = await _result(
            page, f"#passkeys tbody tr[data-credential-id='{gone}'] button.delete"
        )
        assert text.endswith("deleted."), text
        await _rows(page, 1)
        [kept] = await page.credentials(phone)
        assert await page.evaluate(
            "document.querySelector('#passkeys tbody tr').dataset.credentialId"
        ) == _b64url(kept["credentialId"])

        text, _ = await _result(page, "#sign-out")
        assert text == "Signed out."
        assert await page.evaluate("document.querySelector('#account').hidden") is True
        # The phone's passkey still signs in.
        await page.fill("#user-name", name)
        text, _ = await _result(page, "#sign-in")
        assert text == f"Signed in as {name}.", text
        await _rows(page, 1)

        # The deleted passkey, still on the laptop (restored here), never verifies again.
        await page.remove_virtual_authenticator(phone)
        laptop = await page.add_virtual_authenticator()
        await page.add_credential(laptop, first)
        text, reason = await _result(page, "#sign-in-usernameless")
        assert reason == "unknown_credential", text


async def test_usernameless_sign_in_names_the_account(pages: Pages, chromium: Chromium) -> None:
    name = f"bob-{secrets.token_hex(4)}"
    async with cdp_session(chromium) as browser:
        page = await browser.new_page()
        await page.add_virtual_authenticator()
        await _open(page, pages.url)
        await _register(page, name)
        await page.fill("#user-name", "")
        text, _ = await _result(page, "#sign-in-usernameless")
        assert text == f"Signed in as {name}.", text
        await _rows(page, 1)
        assert await page.text("#account-name") == name


async def test_list_and_delete_need_a_sign_in(pages: Pages, chromium: Chromium) -> None:
    async with cdp_session(chromium) as browser:
        page = await browser.new_page()
        await _open(page, pages.url)
        replies = await page.evaluate("""Promise.all([
            fetch('/api/passkeys').then(r => r.json()),
            fetch('/api/passkeys/delete', {method: 'POST',
                  headers: {'Content-Type': 'application/json'},
                  body: JSON.stringify({credential_id: 'AAAA'})}).then(r => r.json())])""")
        assert [r["reason"] for r in replies] == ["not_signed_in", "not_signed_in"], replies


async def test_a_replayed_assertion_is_refused_on_the_page(
    pages: Pages, chromium: Chromium
) -> None:
    name = f"carol-{secrets.token_hex(4)}"
    async with cdp_session(chromium) as browser:
        page = await browser.new_page()
        await page.add_virtual_authenticator()
        await _open(page, pages.url)
        await _register(page, name)
        await page.fill("#user-name", name)
        text, _ = await _result(page, "#sign-in")
        assert text == f"Signed in as {name}.", text
        text, reason = await _result(page, "#replay")
        assert reason == "challenge_reused", text
        assert text.startswith("Refused: challenge_reused"), text


async def test_a_foreign_origin_is_refused_on_the_page(pages: Pages, chromium: Chromium) -> None:
    """The same pages served from an origin the service does not allow: registering and
    signing in there are refused with `origin_mismatch`, shown on the page."""
    name = f"erin-{secrets.token_hex(4)}"
    async with cdp_session(chromium) as browser:
        page = await browser.new_page()
        await page.add_virtual_authenticator()
        await _open(page, pages.foreign_url)
        await page.fill("#user-name", name)
        text, reason = await _result(page, "#register")
        assert reason == "origin_mismatch", text

        # A passkey registered on the real origin (same RP ID) cannot sign in on the foreign one.
        await _open(page, pages.url)
        await _register(page, name)
        await _open(page, pages.foreign_url)
        await page.fill("#user-name", name)
        text, reason = await _result(page, "#sign-in")
        assert reason == "origin_mismatch", text
        assert text.startswith("Refused: origin_mismatch"), text
        await page.screenshot(SCREENSHOTS / "foreign-origin.png")


async def test_a_cross_site_request_is_refused_before_the_bus(pages: Pages) -> None:
    """A request carrying another site's Origin (CSRF) is refused by the gateway itself."""
    async with httpx.AsyncClient() as client:
        foreign = await client.post(
            f"{pages.url}/api/challenge", json={}, headers={"Origin": pages.foreign_url}
        )
        own = await client.post(
            f"{pages.url}/api/challenge", json={}, headers={"Origin": pages.url}
        )
        plain = await client.post(
            f"{pages.url}/api/challenge", content=b"{}", headers={"Origin": pages.url}
        )
    assert foreign.status_code == 403 and foreign.json()["reason"] == "cross_origin"
    assert own.status_code == 200 and own.json()["ok"] is True, own.text
    # Not JSON (what a cross-site form could send without a preflight): refused.
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "invalid_request"
