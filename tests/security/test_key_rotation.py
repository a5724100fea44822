"""Rotating the pseudonym key under a live stack keeps every consent and passkey reachable.

The README's procedure, played with real worker processes on one nats-server, the real
ledger and WebAuthn providers, and requests flowing between the steps:

1. workers run with `LUKHAS_PSEUDONYM_KEYS=old`;
2. a worker with `old,new` (new key known, not yet used) joins, and the old one leaves;
3. a worker with `new,old` (new key current) joins, and the `old,new` one leaves.

While two workers share the queue group either may answer, and both must give the same
answers; after the rotation the data written under the old key is still found, new writes
go under the new key, and a withdrawal after the rotation wins over a grant before it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bus import NatsServer, connect
from lukhas import subjects
from lukhas.config import Settings
from lukhas.observability.pseudonym import Pseudonymizer
from lukhas.transparency.note import Signer
from tests.candidate._support import LEDGER_WRAPPING_KEY
from tests.candidate.authenticator import SoftAuthenticator
from tests.faults._harness import request_json
from tests.integration.processes import LukhasProcess

pytestmark = pytest.mark.nats

OLD = "rotation-old-pseudonym-key-" + "a" * 16
NEW = "rotation-new-pseudonym-key-" + "b" * 16
SIGNING_KEY = Signer.generate("rotation.test/consent").private_key_string()


@contextmanager
def worker(nats_url: str, keys: str) -> Iterator[LukhasProcess]:
    env = {
        "NATS_URL": nats_url,
        "LUKHAS_PSEUDONYM_KEY": "",  # the base environment's single key: use the list instead
        "LUKHAS_PSEUDONYM_KEYS": keys,
        "LUKHAS_LEDGER_SIGNING_KEY": SIGNING_KEY,
        "LUKHAS_LEDGER_WRAPPING_KEY": LEDGER_WRAPPING_KEY,
        "FEATURE_GOVERNANCE_LEDGER": "true",
        "FEATURE_IDENTITY_PASSKEY": "true",
    }
    proc = LukhasProcess("worker", "slices", env=env)
    try:
        proc.wait_for_line("ready", 60)
        yield proc
    finally:
        assert proc.stop() == 0, proc.stderr[-20:]


async def test_rotation_under_a_live_stack_keeps_consents_and_passkeys(
    nats_server: NatsServer,
) -> None:
    user_id = f"usr_rot_{secrets.token_hex(4)}"
    scope = {"user_id": user_id, "scope": "email.read"}
    authn = SoftAuthenticator()
    async with connect(Settings(nats_url=nats_server.url)) as client:

        async def call(subject: str, body: object) -> dict[str, object]:
            return await request_json(client, subject, body)

        async def login() -> dict[str, object]:
            challenge = await call(subjects.PASSKEY_CHALLENGE, {"user_id": user_id})
            return await call(subjects.PASSKEY_VERIFY, authn.get(challenge["options"]))

        with worker(nats_server.url, OLD):
            assert (await call(subjects.CONSENT_RECORD, scope))["ok"] is True
            options = await call(subjects.PASSKEY_REGISTER_OPTIONS, {"user_id": user_id})
            registered = await call(
                subjects.PASSKEY_REGISTER_VERIFY,
                {"user_id": user_id, "credential": authn.create(options["options"])},
            )
            assert registered["ok"] is True, registered
            handle = registered["user_handle"]
            # Step 2 joins while step 1 still serves: the new key is known, not yet used.
            with worker(nats_server.url, f"{OLD},{NEW}"):
                pass_one = [await call(subjects.CONSENT_STATUS, scope) for _ in range(4)]
        assert {r["status"] for r in pass_one} == {"granted"}

        with worker(nats_server.url, f"{OLD},{NEW}"):
            # Step 3 joins while step 2 serves: both answers must agree whoever answers.
            with worker(nats_server.url, f"{NEW},{OLD}"):
                mixed = [await call(subjects.CONSENT_STATUS, scope) for _ in range(6)]
                logins = [await login() for _ in range(2)]
        assert {r["status"] for r in mixed} == {"granted"}
        assert all(r["ok"] is True and r["user_handle"] == handle for r in logins), logins

        with worker(nats_server.url, f"{NEW},{OLD}"):
            assert (await call(subjects.CONSENT_REVOKE, scope))["ok"] is True
            status = await call(subjects.CONSENT_STATUS, scope)
            history = await call(subjects.CONSENT_HISTORY, {"user_id": user_id})
            listed = await call(subjects.PASSKEY_LIST, {"user_id": user_id})
            after = await login()
        # The grant went under the old key's pseudonym, the revoke under the new one's.
        old, new = Pseudonymizer(OLD)(user_id), Pseudonymizer(NEW)(user_id)
        js = client.jetstream()
        written = {
            name: (await js.stream_info(
                "CONSENT_LEDGER", subjects_filter=f"lukhas.ledger.consent.{psn}.>"
            )).state.subjects or {}
            for name, psn in (("old", old), ("new", new))
        }
    assert status["status"] == "revoked"  # the withdrawal after the rotation wins
    assert [r["action"] for r in history["records"]] == ["grant", "revoke"]
    assert [c["credential_id"] for c in listed["credentials"]] == [registered["credential_id"]]
    assert after["ok"] is True and after["user_handle"] == handle
    assert sum(written["old"].values()) == 1 and sum(written["new"].values()) == 1, written
