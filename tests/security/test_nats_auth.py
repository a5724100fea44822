"""NATS access control: the shipped server config, and every credential kind Settings carries.

A nats-server runs `deploy/nats-server.conf` (copied with a temporary store, a free
monitoring port and random passwords in the environment, as compose passes them). The
workers connect as their own users and serve; a client calls them; and the permissions
hold: `slices` cannot spoof alerts or stats, nor read MATRIZ by subscription or through
JetStream, nor delete a stream; `client` cannot publish MATRIZ nodes or touch JetStream.
(tests/security/test_nats_permissions.py plays the inbox, JetStream API and handoff attacks.)

A refused operation is observed two ways: nats-py hands the server's `-ERR 'Permissions
Violation ...'` to the connection's error callback before the next PONG (so after a flush
it has arrived), and a marker published after it on an allowed subject arrives while the
forbidden message never does (per-connection order makes that conclusive, without a wait).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import logging
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import nats
import nats.errors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nats.aio.client import Client

from bus import BusConnectError, NatsServer, PermissionDenied, connect
from bus.server import free_port
from lukhas import subjects
from lukhas.config import Settings
from lukhas.observability.matriz_emit import make_node
from tests.candidate._support import LEDGER_SIGNING_KEY, LEDGER_WRAPPING_KEY
from tests.faults._harness import lukhas_worker, request_json, stats
from tests.integration.processes import REPO

pytestmark = pytest.mark.nats

DEPLOY_CONF = REPO / "deploy" / "nats-server.conf"
#: Each user of the config and the environment variable holding its password.
PASSWORD_VARIABLES: dict[str, str] = dict(
    re.findall(r"\{user:\s*(\w+),\s*password:\s*\$(\w+)", DEPLOY_CONF.read_text())
)
USERS = tuple(PASSWORD_VARIABLES)


@dataclass
class AuthServer:
    server: NatsServer
    passwords: dict[str, str]
    #: The HTTP monitoring port of the config (`/jsz` shows streams as an operator sees them).
    monitor_port: int = 0

    @property
    def url(self) -> str:
        return self.server.url

    def settings(self, user: str, **overrides: object) -> Settings:
        return Settings(
            nats_url=self.url, nats_user=user, nats_password=self.passwords[user],
            pseudonym_key="auth-test-pseudonym-key-0123456789abcdef", **overrides,  # type: ignore[arg-type]
        )

    def env(self, user: str, **extra: str) -> dict[str, str]:
        return {
            "NATS_URL": self.url, "NATS_USER": user, "NATS_PASSWORD": self.passwords[user],
            **extra,
        }


def generated_config(directory: Path) -> Path:
    """deploy/nats-server.conf with a temporary store and a free monitoring port.

    The client port comes from the launcher's `-p`, which overrides the file's.
    """
    text = DEPLOY_CONF.read_text()
    text, n_store = re.subn(r"store_dir:\s*\S+", f'store_dir: "{directory / "js"}"', text)
    text, n_http = re.subn(r"http_port:\s*\d+", f"http_port: {free_port()}", text)
    assert n_store == 1 and n_http == 1, "deploy/nats-server.conf changed shape"
    path = directory / "nats-server.conf"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    auth = start_deploy_server(tmp_path_factory.mktemp("auth-nats"))
    try:
        yield auth
    finally:
        auth.server.stop()


def start_deploy_server(directory: Path) -> AuthServer:
    """A nats-server running deploy/nats-server.conf, every user with a random password."""
    # Letters and digits, starting with a letter: nats-server parses an environment value as
    # a config value, so e.g. "1kb..." would be read as a size (see the config's comment).
    passwords = {user: "pw" + secrets.token_hex(16) for user in USERS}
    # JetStream comes from the file's `jetstream {}` block (with the temporary store_dir);
    # the launcher's own -js/-sd would clash with it.
    config = generated_config(directory)
    monitor = re.search(r"http_port:\s*(\d+)", config.read_text())
    assert monitor is not None
    server = NatsServer(config_file=config, jetstream=False)
    # nats-server resolves $SLICES_PASSWORD etc. from its environment, as in compose.yaml.
    with pytest.MonkeyPatch.context() as mp:
        for user, password in passwords.items():
            mp.setenv(PASSWORD_VARIABLES[user], password)
        server.start()
    return AuthServer(server, passwords, int(monitor.group(1)))


@dataclass
class Watched:
    """A raw nats-py connection whose asynchronous errors are kept."""

    nc: Client
    errors: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e]


async def round_trip(nc: Client) -> None:
    """Everything written so far has been processed by the server, -ERRs included.

    nats-py writes a flush's PING ahead of commands its flusher has not sent yet, so one
    flush can overtake them; the second one follows them (as bus/nats.py does).
    """
    await nc.flush()
    await nc.flush()


async def watched(auth: AuthServer, user: str, *, inbox_prefix: str | None = None) -> Watched:
    """A raw nats-py connection as `user`, with its own inbox prefix (`_INBOX_<user>`)."""
    holder = Watched(Client())

    async def on_error(exc: Exception) -> None:
        holder.errors.append(str(exc))

    await holder.nc.connect(
        auth.url, user=user, password=auth.passwords[user], error_cb=on_error,
        allow_reconnect=False, inbox_prefix=inbox_prefix or f"_INBOX_{user}",
    )
    return holder


FULL_FLAGS = {
    "FEATURE_GOVERNANCE_LEDGER": "true",
    "LUKHAS_LEDGER_SIGNING_KEY": LEDGER_SIGNING_KEY,
    "LUKHAS_LEDGER_WRAPPING_KEY": LEDGER_WRAPPING_KEY,
    "FEATURE_IDENTITY_PASSKEY": "true",
    "FEATURE_ORCHESTRATION_HANDOFF": "true",
    "LUKHAS_PSEUDONYM_KEY": "auth-test-pseudonym-key-0123456789abcdef",
    "LUKHAS_METRICS_PORT": "0",
}


async def test_workers_serve_under_their_own_users_and_the_client_calls_them(
    auth_server: AuthServer,
) -> None:
    auth = auth_server
    # compose.yaml gives every worker the same feature flags.
    async with (
        lukhas_worker("slices", auth.env("slices", **FULL_FLAGS)) as slices,
        lukhas_worker("observability", auth.env("observability", **FULL_FLAGS)) as observability,
        connect(auth.settings("client")) as bus,
    ):
        consent = await request_json(
            bus, subjects.CONSENT_RECORD, {"user_id": "usr_auth_1", "scope": "gmail.read"}
        )
        history = await request_json(bus, subjects.CONSENT_HISTORY, {"user_id": "usr_auth_1"})
        options = await request_json(
            bus, subjects.PASSKEY_REGISTER_OPTIONS, {"user_id": "usr_auth_1"}
        )
        handoff = await request_json(bus, subjects.CONTEXT_HANDOFF, {"ctx": {"k": 1}})
        with anyio.fail_after(20):
            while (await stats(bus)).get("emit_points", {}).get(
                "CONSENT:governance:record", {}
            ).get("count", 0) < 1:
                pass
    assert consent["ok"] is True and consent["provider"] == "jetstream", consent
    assert history["ok"] is True and len(history["records"]) == 1, history
    assert options["ok"] is True and options["provider"] == "webauthn", options
    assert handoff["ok"] is True and handoff["mode"] == "feature", handoff
    # Nothing the workers needed was refused by the server.
    for proc in (slices, observability):
        denied = [line for line in proc.stderr if "permissions violation" in line.lower()]
        assert not denied, denied


async def test_slices_cannot_spoof_alerts_or_read_matriz(auth_server: AuthServer) -> None:
    auth = auth_server
    slices = await watched(auth, "slices")
    client = await watched(auth, "client")
    try:
        # Alerts: forbidden publish, then an allowed marker (the reply to a request the
        # client made, the one way slices may reach a client); the client sees only it.
        alerts = await client.nc.subscribe("lukhas.observability.alerts.>")
        probe = await slices.nc.subscribe("lukhas.governance.consent.marker")
        await round_trip(slices.nc)
        inbox = client.nc.new_inbox()
        markers = await client.nc.subscribe(inbox)
        await round_trip(client.nc)
        await client.nc.publish("lukhas.governance.consent.marker", b"", reply=inbox)
        request = await probe.next_msg(timeout=5)
        await slices.nc.publish("lukhas.observability.alerts.CONSENT.governance.record", b"{}")
        await slices.nc.publish(subjects.OBSERVABILITY_STATS, b"{}")
        await slices.nc.publish(request.reply, b"after")
        await round_trip(slices.nc)
        assert (await markers.next_msg(timeout=5)).data == b"after"
        with pytest.raises(nats.errors.TimeoutError):
            await alerts.next_msg(timeout=0)  # nothing was delivered ahead of the marker
        assert any("publish to \"lukhas.observability.alerts." in v for v in slices.violations())
        assert any(f'publish to "{subjects.OBSERVABILITY_STATS}"' in v
                   for v in slices.violations())

        # MATRIZ by subscription: refused; a node then a marker from one publisher (on
        # `$SRV.`, which slices may both publish and read).
        spy = await slices.nc.subscribe("matriz.>")
        inbox = f"$SRV.marker.{secrets.token_hex(4)}"
        marker = await slices.nc.subscribe(inbox)
        await round_trip(slices.nc)
        assert any('subscription to "matriz.>"' in v for v in slices.violations())
        node = make_node("CONSENT", "governance:record", outcome="ok", latency_ms=1.0,
                         trace_id="1" * 32, producer="auth-test", capability="record_consent")
        await slices.nc.publish(node.subject, json.dumps({"id": node.id}).encode())
        await slices.nc.publish(inbox, b"after")
        assert (await marker.next_msg(timeout=5)).data == b"after"
        with pytest.raises(nats.errors.TimeoutError):
            await spy.next_msg(timeout=0)

        # MATRIZ through JetStream: the stream exists (the observability user makes it)...
        observability = await watched(auth, "observability")
        try:
            js = observability.nc.jetstream()
            from workers.service.streams import ensure_matriz_stream

            await ensure_matriz_stream(js)
            await round_trip(observability.nc)
            assert observability.violations() == []
        finally:
            await observability.nc.close()
        # ...but a slice worker can neither consume it, read a node, nor delete it.
        slices_js = slices.nc.jetstream(timeout=1.0)
        before = len(slices.violations())
        with pytest.raises(nats.errors.TimeoutError):
            await slices_js.pull_subscribe("matriz.>", durable="spy", stream="MATRIZ")
        with pytest.raises(nats.errors.TimeoutError):
            await slices_js.get_msg("MATRIZ", seq=1)
        with pytest.raises(nats.errors.TimeoutError):
            await slices_js.delete_stream("MATRIZ")
        await round_trip(slices.nc)
        refused = slices.violations()[before:]
        assert any("$js.api.consumer." in v and "matriz" in v for v in refused), refused
        assert any("$js.api.stream.msg.get.matriz" in v for v in refused), refused
        assert any("$js.api.stream.delete.matriz" in v for v in refused), refused
    finally:
        await slices.nc.close()
        await client.nc.close()


async def test_client_cannot_publish_matriz_or_use_jetstream(auth_server: AuthServer) -> None:
    client = await watched(auth_server, "client")
    try:
        await client.nc.publish("matriz.CONSENT.governance.record", b"{}")
        await client.nc.publish("lukhas.context.planner", b"{}")  # only slices hand off
        await round_trip(client.nc)
        with pytest.raises(nats.errors.TimeoutError):
            await client.nc.jetstream(timeout=1.0).stream_info("CONSENT_LEDGER")
        await round_trip(client.nc)
    finally:
        await client.nc.close()
    violations = client.violations()
    assert any('publish to "matriz.consent.governance.record"' in v for v in violations)
    assert any('publish to "lukhas.context.planner"' in v for v in violations)
    assert any("$js.api.stream.info.consent_ledger" in v for v in violations), violations


async def test_the_bus_logs_a_refused_publish(
    auth_server: AuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The service's own connection surfaces a violation in its log (bus/nats.py error_cb)
    and the flush after the publish raises it."""
    caplog.set_level(logging.WARNING, logger="bus.nats")
    async with connect(auth_server.settings("slices")) as bus:
        await bus.publish("lukhas.observability.alerts.spoofed", b"{}")
        with pytest.raises(PermissionDenied, match="alerts.spoofed"):
            await bus.flush()
    assert any(
        "permissions violation for publish" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


async def test_a_flush_waits_behind_every_queued_publish(
    auth_server: AuthServer, internals: str
) -> None:
    """One PING must follow thousands of publishes still queued in nats-py: a refused one
    at the end of the queue is reported by the flush, never after it."""
    async with connect(auth_server.settings("slices")) as bus:
        for round_ in range(3):
            for _ in range(3000):
                await bus.publish(subjects.MATRIZ_PREFIX + ".queued", b"x" * 256)
            await bus.publish(f"lukhas.observability.alerts.spoofed{round_}", b"{}")
            with pytest.raises(PermissionDenied, match=f"alerts.spoofed{round_}"):
                await bus.flush()
        await bus.flush()  # and a flush with nothing refused since passes


async def test_wrong_password_is_a_clear_connect_error(auth_server: AuthServer) -> None:
    settings = Settings(nats_url=auth_server.url, nats_user="slices", nats_password="wrong")
    with pytest.raises(BusConnectError, match="(?i)authorization"):
        async with connect(settings):
            pass
    with pytest.raises(BusConnectError, match="(?i)authorization"):
        async with connect(Settings(nats_url=auth_server.url)):
            pass


def test_the_cli_carries_credentials_from_the_environment(auth_server: AuthServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "request", subjects.CONSENT_STATUS,
         '{"user_id":"usr_cli_auth","scope":"gmail.read"}', "--timeout", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**_clean_env(), **auth_server.env("client")},
    )
    # Nobody serves it in this test, so "no responders" proves the connect succeeded.
    assert "authorization" not in result.stderr.lower(), result.stderr
    assert "no responders" in result.stderr.lower(), result.stderr


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "LUKHAS_"))}


# -- token, user/password and TLS through Settings -> connect --------------------------------


async def roundtrip(settings: Settings) -> None:
    async with connect(settings) as bus, bus.subscribe("auth.check") as sub:
        await bus.publish("auth.check", b"hi")
        assert (await sub.next(timeout=5)).data == b"hi"


async def test_token_auth_via_settings() -> None:
    token = secrets.token_urlsafe(24)
    async with NatsServer(jetstream=False, extra_args=["--auth", token]) as server:
        await roundtrip(Settings(nats_url=server.url, nats_token=token))
        with pytest.raises(BusConnectError, match="(?i)authorization"):
            await roundtrip(Settings(nats_url=server.url, nats_token="not-" + token))


async def test_user_password_auth_via_settings() -> None:
    password = secrets.token_urlsafe(24)
    args = ["--user", "svc", "--pass", password]
    async with NatsServer(jetstream=False, extra_args=args) as server:
        await roundtrip(Settings(nats_url=server.url, nats_user="svc", nats_password=password))
        with pytest.raises(BusConnectError, match="(?i)authorization"):
            await roundtrip(Settings(nats_url=server.url, nats_user="svc", nats_password="x"))


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: x509.Name | None, key: ec.EllipticCurvePrivateKey,
              signer: ec.EllipticCurvePrivateKey, *, ca: bool, san: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = build("lukhas-test-ca", None, ca_key, ca_key, ca=True, san=False)
    server = build("127.0.0.1", ca.subject, server_key, ca_key, ca=False, san=True)
    client = build("lukhas-client", ca.subject, client_key, ca_key, ca=False, san=False)
    files: dict[str, Path] = {}
    for name, cert, key in (("ca", ca, ca_key), ("server", server, server_key),
                            ("client", client, client_key)):
        files[name] = directory / f"{name}.pem"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}_key"] = directory / f"{name}-key.pem"
        files[f"{name}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
    return files


async def test_mutual_tls_via_settings(tmp_path: Path) -> None:
    pem = _certificates(tmp_path)
    args = ["--tlsverify", "--tlscert", str(pem["server"]), "--tlskey", str(pem["server_key"]),
            "--tlscacert", str(pem["ca"])]
    async with NatsServer(jetstream=False, extra_args=args) as server:
        url = f"tls://127.0.0.1:{server.port}"
        await roundtrip(Settings(
            nats_url=url, nats_tls_ca=str(pem["ca"]), nats_tls_cert=str(pem["client"]),
            nats_tls_key=str(pem["client_key"]),
        ))
        # Without a client certificate the server refuses (mid-handshake: the error the
        # client sees is a TLS alert or a broken pipe, whichever comes first).
        with pytest.raises(BusConnectError):
            await roundtrip(Settings(nats_url=url, nats_tls_ca=str(pem["ca"])))
        # Without the CA the client refuses the server: a clear error, at once. (In a child
        # process: nats-py can hang for good closing a connection whose TLS handshake failed,
        # which would hang this test instead of failing it.)
        env = {
            **_clean_env(), "NATS_URL": url, "NATS_TLS_CERT": str(pem["client"]),
            "NATS_TLS_KEY": str(pem["client_key"]),
        }
        try:
            result = await anyio.to_thread.run_sync(functools.partial(
                subprocess.run,
                [sys.executable, "-m", "workers.cli.main", "health", "--timeout", "1"],
                cwd=REPO, capture_output=True, text=True, timeout=10, env=env,
            ))
        except subprocess.TimeoutExpired:
            pytest.fail("connecting without the CA hung instead of failing")
        assert result.returncode == 2, result  # could not connect: the CLI's error status
        assert "CERTIFICATE_VERIFY_FAILED" in result.stderr, result.stderr
