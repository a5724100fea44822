"""The AsyncAPI 3.0 document of the wire contract, generated from the code's own declarations.

Every request subject comes from the slices' endpoint declarations (`lukhas.catalog`), with
its request message, the reply shapes the endpoint declares and the error reply every
endpoint may give. Payload schemas are msgspec's JSON Schema of the Structs (never written
by hand); the MATRIZ node schema is the JSON Schema file the emitter is checked against. The
published subjects (handoff deliveries, MATRIZ nodes, checkpoints, observability), the
service-discovery protocol and the headers complete it. `lukhas asyncapi` prints it; the
committed `asyncapi.json` is its output, and a test keeps the two equal.

Schemas are JSON Schema draft-07 (the AsyncAPI 3.0 default schema format): the few
2020-12 forms msgspec writes (`prefixItems`, `$defs`) are rewritten to their draft-07 forms.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Literal

import msgspec

import lukhas
from lukhas import subjects
from lukhas.catalog import ENDPOINTS
from lukhas.config import Settings
from lukhas.endpoint import Endpoint
from lukhas.observability.matriz_emit import DropReport
from lukhas.orchestration.context.messages import ContextHandedOff, Target
from lukhas.replies import ErrorReply
from workers.service import discovery
from workers.service._canary import Rollback
from workers.service.observability import AggregateState, BurnAlert, StatsSnapshot

ASYNCAPI_VERSION = "3.0.0"
#: Where the committed document lives, relative to the repository root.
DOCUMENT_PATH = "asyncapi.json"
#: Signed C2SP checkpoints of the consent ledger (published, and answered on request).
CHECKPOINT_SUBJECT = subjects.CONSENT_CHECKPOINT
NATS_BINDING_VERSION = "0.1.0"

_SCHEMAS = "#/components/schemas/"
_MESSAGES = "#/components/messages/"
_TRACEPARENT = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


# -- the nats.micro service-discovery replies (io.nats.micro.v1.*_response) -------------------


class MicroPing(msgspec.Struct, frozen=True, kw_only=True):
    """`$SRV.PING` reply (io.nats.micro.v1.ping_response)."""

    type: Literal["io.nats.micro.v1.ping_response"]
    name: str
    id: str
    version: str
    metadata: dict[str, str]


class MicroEndpointInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str]


class MicroInfo(msgspec.Struct, frozen=True, kw_only=True):
    """`$SRV.INFO` reply (io.nats.micro.v1.info_response): every endpoint served."""

    type: Literal["io.nats.micro.v1.info_response"]
    name: str
    id: str
    version: str
    metadata: dict[str, str]
    description: str
    endpoints: list[MicroEndpointInfo]


class EndpointLatency(msgspec.Struct, frozen=True):
    """Processing-time quantiles of one endpoint, ms (HDR histogram; 0 before any request)."""

    p50: float
    p95: float
    p99: float


class EndpointCanary(msgspec.Struct, frozen=True, kw_only=True):
    """The canary of the endpoint's slice in this worker (README, "Canary runs")."""

    #: The share variable, e.g. LUKHAS_CANARY_GOVERNANCE_LEDGER.
    variable: str | None
    state: Literal["off", "running", "rolled_back", "full"]
    configured_percent: float
    #: The share the canary arm takes now (0 unless running).
    percent: float
    #: Arms by data subject (stateful slices) rather than drawn per call.
    sticky: bool
    #: Calls each arm served in this worker.
    served: dict[str, int]
    #: Once rolled back: `reason`, `message`, `emit_point`, `at` (epoch s), `by` (worker id).
    rollback: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class EndpointStatsData(msgspec.Struct, frozen=True, kw_only=True):
    """The `data` of an endpoint's stats: what nats.micro's averages cannot give."""

    latency_ms: EndpointLatency
    #: Requests buffered in the subscription now, its bound, and slow-consumer drops.
    pending: int | msgspec.UnsetType = msgspec.UNSET
    max_pending: int | msgspec.UnsetType = msgspec.UNSET
    dropped: int | msgspec.UnsetType = msgspec.UNSET
    #: Read-only endpoints: messages without a reply subject (announcements, or queries
    #: nobody awaits), counted and not handled.
    unawaited: int | msgspec.UnsetType = msgspec.UNSET
    #: Requests refused `overloaded` (past their queue budget, or the queue full).
    overloaded: int | msgspec.UnsetType = msgspec.UNSET
    #: Requests dropped because their reply subject was not a requester's inbox.
    refused_replies: int | msgspec.UnsetType = msgspec.UNSET
    #: Requests read and waiting for a handler now.
    queued: int | msgspec.UnsetType = msgspec.UNSET
    #: The queue budget (the endpoint's SLA), ms.
    budget_ms: float | msgspec.UnsetType = msgspec.UNSET
    #: The measured time between two requests served (the service rate's inverse), µs.
    service_interval_us: float | msgspec.UnsetType = msgspec.UNSET
    #: Deferred endpoints (the handoff with its builtin publisher): calls published and
    #: parked on their confirmation now (at most LUKHAS_HANDOFF_MAX_INFLIGHT).
    parked: int | msgspec.UnsetType = msgspec.UNSET
    canary: EndpointCanary | msgspec.UnsetType = msgspec.UNSET


class MicroEndpointStats(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    subject: str
    queue_group: str
    num_requests: int
    num_errors: int
    last_error: str
    #: Nanoseconds, total and per request.
    processing_time: int
    average_processing_time: int
    data: EndpointStatsData


class MicroStats(msgspec.Struct, frozen=True, kw_only=True):
    """`$SRV.STATS` reply (io.nats.micro.v1.stats_response)."""

    type: Literal["io.nats.micro.v1.stats_response"]
    name: str
    id: str
    version: str
    metadata: dict[str, str]
    #: RFC 3339, UTC.
    started: str
    endpoints: list[MicroEndpointStats]


_MICRO_REPLIES: dict[str, type] = {"PING": MicroPing, "INFO": MicroInfo, "STATS": MicroStats}


# -- building the document -------------------------------------------------------------------


def build_document(settings: Settings | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every subject, as a JSON-ready dict.

    Body limits that depend on configuration are given for `settings` (default: defaults).
    """
    settings = settings or Settings()
    doc = _Document()
    for endpoint in ENDPOINTS:
        doc.add_endpoint(endpoint, settings)
    doc.add_published()
    doc.add_discovery()
    return doc.render()


def render(document: dict[str, Any]) -> str:
    """The document as the committed file holds it: indented JSON and a final newline."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def reply_operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each request operation's channel address and the payload schemas its replies may take.

    For `$SRV` channels the address has a `{service_id}` parameter.
    """
    found = {}
    channels = document["channels"]
    messages = document["components"]["messages"]
    for name, op in document["operations"].items():
        if "reply" not in op:
            continue
        channel = channels[_ref_name(op["channel"]["$ref"])]
        reply_channel = channels[_ref_name(op["reply"]["channel"]["$ref"])]
        payloads = [
            messages[_ref_name(reply_channel["messages"][_ref_name(ref["$ref"])]["$ref"])][
                "payload"
            ]
            for ref in op["reply"]["messages"]
        ]
        found[name] = {"address": channel["address"], "payloads": payloads}
    return found


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


class _Document:
    def __init__(self) -> None:
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        self._types: list[Any] = []
        self._extra_schemas: dict[str, Any] = {}

    # -- schemas and messages --------------------------------------------------------------

    def schema_of(self, tp: Any) -> dict[str, Any]:
        """A `$ref` to the Struct's component schema (resolved in `render`)."""
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            self._types.append(tp)
            return {"$ref": _SCHEMAS + tp.__name__}
        return _draft07(msgspec.json.schema(tp))

    def message(
        self, key: str, payload: dict[str, Any], *, title: str, summary: str | None = None,
        headers: str | None = None, content_type: str = "application/json",
    ) -> dict[str, str]:
        """Register a component message once and return a reference to it."""
        if key not in self.messages:
            message: dict[str, Any] = {"name": key, "title": title}
            if summary:
                message["summary"] = summary
            message["contentType"] = content_type
            if headers:
                message["headers"] = {"$ref": _SCHEMAS + headers}
            message["payload"] = payload
            self.messages[key] = message
        return {"$ref": _MESSAGES + key}

    def struct_message(self, tp: type, *, headers: str | None = None) -> dict[str, str]:
        doc = (tp.__doc__ or "").strip()
        summary = doc.split("\n\n", 1)[0].replace("\n    ", " ").replace("\n", " ") or None
        return self.message(
            tp.__name__, self.schema_of(tp), title=tp.__name__, summary=summary, headers=headers
        )

    # -- channels and operations -----------------------------------------------------------

    def channel(
        self, key: str, address: str | None, messages: dict[str, dict[str, str]], *,
        description: str, parameters: dict[str, Any] | None = None,
    ) -> dict[str, str]:
        channel: dict[str, Any] = {"address": address, "description": description}
        channel["messages"] = messages
        if parameters:
            channel["parameters"] = parameters
        self.channels[key] = channel
        return {"$ref": f"#/channels/{key}"}

    def request_reply(
        self, key: str, address: str, request: dict[str, str], replies: list[dict[str, str]],
        *, description: str, summary: str, parameters: dict[str, Any] | None = None,
        queue: str | None = None, extensions: dict[str, Any] | None = None,
    ) -> None:
        """A subject the service answers: its channel, its reply channel, the operation."""
        channel = self.channel(
            key, address, {"request": request}, description=description, parameters=parameters
        )
        reply_keys = [_ref_name(r["$ref"]) for r in replies]
        reply_channel = self.channel(
            f"{key}.reply", None, {k: r for k, r in zip(reply_keys, replies, strict=True)},
            description=f"The requester's reply subject (its inbox) for `{address}`: one "
            "JSON reply per request.",
        )
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": channel,
            "summary": summary,
            "messages": [{"$ref": f"#/channels/{key}/messages/request"}],
            "reply": {
                "channel": reply_channel,
                "messages": [{"$ref": f"#/channels/{key}.reply/messages/{k}"} for k in reply_keys],
            },
        }
        if queue:
            operation["bindings"] = {
                "nats": {"queue": queue, "bindingVersion": NATS_BINDING_VERSION}
            }
        operation.update(extensions or {})
        self.operations[key] = operation

    def publish(
        self, key: str, address: str, message: dict[str, str], *, description: str,
        summary: str, parameters: dict[str, Any] | None = None,
    ) -> None:
        """A subject the service publishes on (nobody replies)."""
        same = [k for k, c in self.channels.items() if c["address"] == address]
        if same:  # also a request subject (e.g. checkpoints): one channel, two operations
            key = same[0]
            self.channels[key]["messages"]["published"] = message
            self.channels[key]["description"] += f" Also published on: {description}"
            channel = {"$ref": f"#/channels/{key}"}
            op_key = f"{key}.published"
        else:
            channel = self.channel(
                key, address, {"published": message}, description=description,
                parameters=parameters,
            )
            op_key = key
        self.operations[op_key] = {
            "action": "send",
            "channel": channel,
            "summary": summary,
            "messages": [{"$ref": f"#/channels/{key}/messages/published"}],
        }

    # -- the parts -------------------------------------------------------------------------

    def add_endpoint(self, endpoint: Endpoint[Any], settings: Settings) -> None:
        request_type = endpoint.message
        if isinstance(request_type, type) and issubclass(request_type, msgspec.Struct):
            request = self.struct_message(request_type, headers="TraceHeaders")
        else:
            request = self.message(
                f"{endpoint.name}.request", self.schema_of(request_type),
                title=f"{endpoint.name} request", headers="TraceHeaders",
                summary="An open JSON object (see the description of the subject).",
            )
        replies = [
            self.struct_message(tp, headers="ErrorHeaders" if tp is ErrorReply else None)
            for tp in endpoint.replies
        ]
        limit = endpoint.body_limit(settings)
        configurable = callable(endpoint.max_bytes)
        description = (
            f"Served by the slice service in queue group `{subjects.SLICE_QUEUE_GROUP}`. "
            f"Public Python API: `{endpoint.capability}`; MATRIZ emit point "
            f"`{endpoint.emit_point.name}`. Bodies over {limit} bytes"
            f"{' (with default settings)' if configurable else ''} are refused with "
            "`payload_too_large`."
            + (" Read-only: a message without a reply subject is not a request (nobody "
               "awaits it); the service counts it as `unawaited` and does not handle it."
               if endpoint.read_only else "")
        )
        doc = (endpoint.handler.__doc__ or "").strip()
        self.request_reply(
            endpoint.name, endpoint.subject, request, replies,
            description=description,
            summary=doc.split("\n", 1)[0] if doc else f"{endpoint.capability} over NATS",
            queue=subjects.SLICE_QUEUE_GROUP,
            extensions={
                "x-lukhas-capability": endpoint.capability,
                "x-lukhas-emit-point": endpoint.emit_point.name,
                "x-lukhas-max-bytes": limit,
                **({"x-lukhas-read-only": True} if endpoint.read_only else {}),
            },
        )

    def add_published(self) -> None:
        target = msgspec.json.schema(Target)
        self.publish(
            "context.target", f"{subjects.CONTEXT_TARGET_PREFIX}.{{target}}",
            self.struct_message(ContextHandedOff, headers="TraceHeaders"),
            summary="A handed-off context, delivered to its target.",
            description="Where a handoff to `target` is delivered (core publish in DRY_RUN, "
            "captured by a JetStream stream in feature mode); `traceparent` carries the trace.",
            parameters={"target": {
                "description": "The handoff's target: one subject token, "
                f"pattern `{target['pattern']}`, at most {target['maxLength']} characters.",
                "default": "default",
            }},
        )
        self._extra_schemas.update(_matriz_components())
        self.publish(
            "matriz", subjects.MATRIZ_ALL,
            self.message(
                "MatrizNode", {"$ref": _SCHEMAS + "MatrizNode"}, title="MATRIZ node",
                summary="One node per public API call, on `matriz.<TYPE>.<label tokens>` "
                "(e.g. `matriz.CONSENT.governance.record`).",
            ),
            summary="MATRIZ nodes, one per public API call.",
            description="Nodes are published on `matriz.<TYPE>.<label tokens>`; subscribe to "
            "`matriz.>` (a JetStream stream `MATRIZ` captures it when JetStream is on). The "
            "payload schema is `lukhas/observability/matriz_node_v1.json`. No node carries a "
            "raw user id, only the keyed pseudonym.",
        )
        self.publish(
            "matriz.drops", subjects.MATRIZ_DROPS, self.struct_message(DropReport),
            summary="An emitter's dropped-node counters.",
            description="Published by an emitter after a flush that dropped nodes.",
        )
        self.publish(
            "consent.checkpoint", CHECKPOINT_SUBJECT,
            self.message(
                "SignedCheckpoint",
                {"type": "string", "description": "A C2SP tlog-checkpoint (origin line, tree "
                 "size, base64 root hash) signed as a C2SP signed-note with Ed25519; verify "
                 "with the ledger's verifier key (`lukhas consent vkey`)."},
                title="Signed checkpoint", content_type="text/plain",
                headers="CheckpointHeaders",
            ),
            summary="Signed checkpoints of the consent ledger's Merkle tree.",
            description="Each checkpoint the JetStream consent ledger signs (at its "
            "checkpoint interval while appending, on request, on handing the writer lease "
            "back) is announced on the checkpoint request subject itself, without a reply "
            "subject and with the `Lukhas-Checkpoint` header. A watcher tells announcements "
            "(no reply subject, the header, a text note) from requests (a reply subject, a "
            "JSON body); the endpoint is read-only, so the slice service ignores the "
            "announcements. Verify every note with the ledger's verifier key (the header is "
            "no authentication) and keep them to check later proofs against (see README, "
            "\"Verifiable consent ledger\").",
        )
        self.request_reply(
            "observability.stats", subjects.OBSERVABILITY_STATS,
            self.message("StatsRequest", {"type": "object"}, title="Stats request",
                         summary="Any body (`{}`)."),
            [self.struct_message(StatsSnapshot)],
            summary="The observability snapshot, merged over every live observability worker.",
            description="Answered by an observability worker.",
        )
        self.publish(
            "observability.alerts", f"{subjects.ALERTS_PREFIX}.>",
            self.struct_message(BurnAlert),
            summary="SLO burn-rate alerts: one message when an alert fires, one when it resolves.",
            description="Published on `lukhas.observability.alerts.<emit point tokens>` (e.g. "
            "`lukhas.observability.alerts.CONSENT.governance.record`) by one observability "
            "worker.",
        )
        self.publish(
            "observability.state", f"{subjects.OBSERVABILITY_STATE_PREFIX}.{{worker_id}}",
            self.struct_message(AggregateState),
            summary="An observability worker's mergeable aggregate, for its peers.",
            description="Each observability worker publishes its state every check interval.",
            parameters={"worker_id": {"description": "The publishing worker's id."}},
        )
        self.publish(
            "control.canary.rollback", subjects.CANARY_ROLLBACK,
            self.struct_message(Rollback),
            summary="Stop a slice's canary: every call goes to the baseline from now on.",
            description="Published by an observability worker when a canary arm is worse "
            "than its baseline (error rate, or p95 over the manifest SLA); every slice worker "
            "subscribes (no queue group) and stops the named slice's canary at once. See "
            "README, \"Canary runs\".",
        )

    def add_discovery(self) -> None:
        name = subjects.SERVICE_NAME
        for verb in discovery.VERBS:
            reply = self.struct_message(_MICRO_REPLIES[verb])
            request = self.message(
                "MicroRequest", {"type": "object"}, title="Service discovery request",
                summary="An empty body.",
            )
            scopes: list[tuple[str, str, dict[str, Any] | None, str]] = [
                ("", discovery.control_subject(verb), None, "every NATS service"),
                (".service", discovery.control_subject(verb, name), None, f"every `{name}`"),
                (".instance", discovery.control_subject(verb, name) + ".{service_id}",
                 {"service_id": {"description": "One instance's id (from PING or INFO)."}},
                 "one instance"),
            ]
            for suffix, address, parameters, whom in scopes:
                self.request_reply(
                    f"srv.{verb.lower()}{suffix}", address, request, [reply],
                    parameters=parameters,
                    summary=f"NATS service discovery: {verb} ({whom}).",
                    description="The nats.micro protocol, so `nats micro ls|info|stats` list "
                    "the slice service. Every instance answers (no queue group).",
                )

    def render(self) -> dict[str, Any]:
        _, components = msgspec.json.schema_components(
            self._types, ref_template=_SCHEMAS + "{name}"
        )
        schemas = {k: _draft07(v) for k, v in sorted(components.items())}
        for endpoint in ENDPOINTS:
            _tag_optional(endpoint.message, schemas)
        schemas.update(self._extra_schemas)
        schemas.update(_header_schemas())
        return {
            "asyncapi": ASYNCAPI_VERSION,
            "info": {
                "title": "LUKHAS slices",
                "version": lukhas.__version__,
                "description": (
                    "Consent ledger, passkey verify and context handoff over NATS. Bodies "
                    "are JSON. Replies are JSON objects with `ok`: a success shape, a "
                    "refusal `{\"ok\": false, \"reason\", ...}`, or an error `{\"ok\": false, "
                    "\"error\": {\"code\", \"message\"}}` with the nats.micro error headers. "
                    "Generated by `lukhas asyncapi` from the endpoint declarations."
                ),
            },
            "defaultContentType": "application/json",
            "servers": {
                "local": {
                    "host": "localhost:4222",
                    "protocol": "nats",
                    "description": "The embedded nats-server `lukhas up` starts (or NATS_URL).",
                },
            },
            "channels": self.channels,
            "operations": self.operations,
            "components": {"schemas": schemas, "messages": dict(sorted(self.messages.items()))},
        }


def _tag_optional(message: Any, schemas: dict[str, Any]) -> None:
    """A request Struct's tag is optional on the wire: the decoder at the edge does not
    need it (the subject says which message a body is), although msgspec's encoder writes it."""
    config = getattr(message, "__struct_config__", None)
    if config is None or config.tag is None:
        return
    schema = schemas[message.__name__]
    schema["required"] = [f for f in schema.get("required", []) if f != config.tag_field]


def _draft07(schema: Any) -> Any:
    """Rewrite msgspec's 2020-12 tuple form (`prefixItems`, `items: false`) to draft-07."""
    if isinstance(schema, list):
        return [_draft07(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _draft07(v) for k, v in schema.items()}
    if "prefixItems" in out:
        out["items"] = out.pop("prefixItems")
        if schema.get("items") is False:
            out["additionalItems"] = False
    return out


def _matriz_components() -> dict[str, Any]:
    """The MATRIZ node schema and its `$defs` as components (`MatrizNode`, `MatrizNode<Def>`)."""
    text = resources.files("lukhas.observability").joinpath("matriz_node_v1.json").read_text()
    node = json.loads(text)
    defs = node.pop("$defs", {})
    for key in ("$schema", "$id"):
        node.pop(key, None)

    def relink(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: (_SCHEMAS + "MatrizNode" + v.removeprefix("#/$defs/")
                    if k == "$ref" and isinstance(v, str) else relink(v))
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [relink(v) for v in value]
        return value

    found = {"MatrizNode": relink(node)}
    found.update({f"MatrizNode{name}": relink(schema) for name, schema in defs.items()})
    return found


def _header_schemas() -> dict[str, Any]:
    return {
        "TraceHeaders": {
            "type": "object",
            "description": "Optional request and delivery headers.",
            "properties": {
                "traceparent": {
                    "type": "string",
                    "pattern": _TRACEPARENT,
                    "description": "W3C trace context; its trace id becomes the MATRIZ node's "
                    "trace id (and a consent entry's `trace_id`).",
                },
            },
        },
        "CheckpointHeaders": {
            "type": "object",
            "description": "The header of a checkpoint announcement.",
            "properties": {
                subjects.CHECKPOINT_HEADER: {
                    "type": "string", "pattern": "^[0-9]+$",
                    "description": "The announced checkpoint's tree size (decimal), as in "
                    "the note's second line.",
                },
            },
            "required": [subjects.CHECKPOINT_HEADER],
        },
        "ErrorHeaders": {
            "type": "object",
            "description": "nats.micro's error headers, sent with every error reply.",
            "properties": {
                "Nats-Service-Error": {
                    "type": "string", "description": "The error message.",
                },
                "Nats-Service-Error-Code": {
                    "type": "string", "pattern": "^[0-9]{3}$",
                    "description": "An HTTP-like status: 400 invalid request, 413 payload "
                    "too large, 500 internal (other codes 400).",
                },
            },
            "required": ["Nats-Service-Error", "Nats-Service-Error-Code"],
        },
    }
