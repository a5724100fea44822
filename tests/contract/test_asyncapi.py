"""The AsyncAPI document: valid AsyncAPI 3.0, covering every subject, committed as generated."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import msgspec
import pytest

from lukhas import subjects
from lukhas.catalog import ENDPOINTS
from lukhas.observability.matriz_decorators import EMIT_POINTS
from lukhas.testing import dry_run_settings, open_test_runtime
from tests.contract._replies import asyncapi_schema, current_audit
from workers.service import discovery
from workers.service.slices import SliceService
from workers.tools.asyncapi import DOCUMENT_PATH, build_document, render

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_document()


def _errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(asyncapi_schema())
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in validator.iter_errors(document)
    ]


def test_the_vendored_schema_is_the_official_asyncapi_3_0_0_schema() -> None:
    schema = asyncapi_schema()
    assert schema["$id"] == "http://asyncapi.com/definitions/3.0.0/asyncapi.json"
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema"
    jsonschema.Draft7Validator.check_schema(schema)


def test_the_document_is_valid_asyncapi_3(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert _errors(document) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d["operations"]["consent_record"].update(action="publish"),  # 2.x word
        lambda d: d["channels"]["consent_record"].update(subscribe={}),  # 2.x field
        lambda d: d["components"]["messages"]["ErrorReply"].update(headers=[]),
        lambda d: d["operations"]["consent_record"]["bindings"]["nats"].update(queue=7),
        lambda d: d.pop("info"),
    ],
)
def test_the_validation_rejects_a_broken_document(document: dict[str, Any], breakage: Any) -> None:
    broken = copy.deepcopy(document)
    breakage(broken)
    assert _errors(broken), "the vendored schema accepted a broken document"


def test_every_local_reference_resolves(document: dict[str, Any]) -> None:
    refs: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            ref = value.get("$ref")
            if isinstance(ref, str):
                refs.append(ref)
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(document)
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        node: Any = document
        for part in ref[2:].split("/"):
            assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
            node = node[part]


def test_operations_use_messages_of_their_own_channels(document: dict[str, Any]) -> None:
    for name, op in document["operations"].items():
        channel = op["channel"]["$ref"]
        for message in op["messages"]:
            assert message["$ref"].startswith(channel + "/messages/"), (name, message)
        if "reply" in op:
            reply_channel = op["reply"]["channel"]["$ref"]
            for message in op["reply"]["messages"]:
                assert message["$ref"].startswith(reply_channel + "/messages/"), (name, message)


def test_every_endpoint_is_a_request_reply_operation_with_its_declared_shapes(
    document: dict[str, Any],
) -> None:
    for endpoint in ENDPOINTS:
        assert endpoint.reply, f"{endpoint.name} declares no reply shapes (reply=...)"
        op = document["operations"][endpoint.name]
        assert op["action"] == "receive"
        assert document["channels"][endpoint.name]["address"] == endpoint.subject
        assert op["bindings"]["nats"]["queue"] == subjects.SLICE_QUEUE_GROUP
        replies = [m["$ref"].rsplit("/", 1)[-1] for m in op["reply"]["messages"]]
        assert replies == [tp.__name__ for tp in endpoint.replies]
        assert replies[-1] == "ErrorReply"
        error = document["components"]["messages"]["ErrorReply"]
        headers = document["components"]["schemas"][error["headers"]["$ref"].rsplit("/")[-1]]
        assert set(headers["required"]) == {"Nats-Service-Error", "Nats-Service-Error-Code"}
        request = document["components"]["messages"][
            document["channels"][endpoint.name]["messages"]["request"]["$ref"].rsplit("/")[-1]
        ]
        assert request["headers"]["$ref"].endswith("/TraceHeaders")


def test_payload_schemas_come_from_the_structs(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for endpoint in ENDPOINTS:
        for tp in endpoint.replies:
            (_,), generated = msgspec.json.schema_components([tp])
            published = schemas[tp.__name__]
            fields = {f.encode_name for f in msgspec.structs.fields(tp)}
            assert set(published["properties"]) == fields
            assert published["required"] == generated[tp.__name__].get("required", [])


def test_requests_as_clients_send_them_validate(document: dict[str, Any]) -> None:
    """The README's bodies (no msgspec tag) match the published request schemas."""
    examples = {
        subjects.CONSENT_RECORD: {"user_id": "u1", "scope": "gmail.read"},
        subjects.CONSENT_STATUS: {"user_id": "u1", "scope": "gmail.read"},
        subjects.PASSKEY_CHALLENGE: {},
        subjects.CONTEXT_HANDOFF: {"ctx": {"task": "plan"}, "target": "planner"},
    }
    channels = {c["address"]: c for c in document["channels"].values()}
    for subject, body in examples.items():
        ref = channels[subject]["messages"]["request"]["$ref"].rsplit("/")[-1]
        payload = document["components"]["messages"][ref]["payload"]
        validator = jsonschema.Draft7Validator({**payload, "components": document["components"]})
        assert list(validator.iter_errors(body)) == [], subject
        assert not validator.is_valid({**body, "type": "something.else"}), subject


def _channel_for(document: dict[str, Any], subject: str) -> str | None:
    """The channel whose address covers `subject` (`{param}` = one token, `>` = the rest)."""
    for name, channel in document["channels"].items():
        address = channel["address"]
        if address is None:
            continue
        pattern = re.escape(address).replace(r"\{", "{").replace(r"\}", "}")
        pattern = re.sub(r"\{[^}]+\}", r"[^.]+", pattern).replace(">", ".+")
        if re.fullmatch(pattern, subject):
            return name
    return None


async def test_every_served_subject_appears(document: dict[str, Any]) -> None:
    """What a running slice service subscribes and lists in `$SRV.INFO` is all documented."""
    async with open_test_runtime(dry_run_settings()) as (runtime, _):
        service = SliceService(runtime)
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            reply = await runtime.bus.request(
                discovery.control_subject("INFO", subjects.SERVICE_NAME), b"", timeout=5
            )
            info = msgspec.json.decode(reply.data)
            served = {sub.subject for sub in service._subscriptions}
            await service.stop()
    listed = {ep["subject"] for ep in info["endpoints"]}
    assert listed == {ep.subject for ep in ENDPOINTS}
    assert any(s.startswith("$SRV.") for s in served)
    missing = sorted(s for s in served | listed if _channel_for(document, s) is None)
    assert missing == []
    for subject in served | listed:
        name = _channel_for(document, subject)
        if subject == subjects.CANARY_ROLLBACK:  # an order the service hears: no reply
            assert name is not None and document["operations"][name]["action"] == "send"
            continue
        assert name is not None and document["operations"].get(name, {}).get("reply"), subject


def test_every_published_subject_appears(document: dict[str, Any]) -> None:
    points = [p for p in EMIT_POINTS.values() if p.module.startswith("lukhas.")]
    assert points
    published = [subjects.matriz_subject(p.node_type, p.label) for p in points]
    published += [subjects.alert_subject(p.name) for p in points]
    published += [
        subjects.context_target("planner"),
        subjects.MATRIZ_DROPS,
        f"{subjects.OBSERVABILITY_STATE_PREFIX}.worker-1",
        "lukhas.governance.consent.checkpoint",
        subjects.CANARY_ROLLBACK,
    ]
    for subject in published:
        name = _channel_for(document, subject)
        assert name is not None, f"{subject} is not in the AsyncAPI document"
        ops = [op for op in document["operations"].values()
               if op["channel"]["$ref"] == f"#/channels/{name}"]
        assert any(op["action"] == "send" for op in ops), subject
    matriz = document["components"]["schemas"]["MatrizNode"]
    assert matriz["properties"]["state"]["$ref"] == "#/components/schemas/MatrizNodeState"


def test_the_committed_document_is_the_generated_one(document: dict[str, Any]) -> None:
    committed = (REPO / DOCUMENT_PATH).read_text(encoding="utf-8")
    assert committed == render(document), (
        f"{DOCUMENT_PATH} is stale: run `lukhas asyncapi --output {DOCUMENT_PATH}` and commit it"
    )


def test_lukhas_asyncapi_prints_the_document(document: dict[str, Any]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "asyncapi"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
    )
    assert out.stdout == render(document)


def test_the_reply_audit_covers_every_request_subject(document: dict[str, Any]) -> None:
    audit = current_audit()
    for endpoint in ENDPOINTS:
        assert audit.covers(endpoint.subject)
    assert audit.covers(discovery.control_subject("STATS", subjects.SERVICE_NAME, "abc123"))
    assert audit.covers(subjects.OBSERVABILITY_STATS)
    assert not audit.covers("lukhas.nothing.here")
