"""Replies checked against the published contract: the AsyncAPI document's reply schemas.

`ReplyAudit(document)` finds the request operation of a subject (endpoints, `$SRV`, the
observability stats) and checks a reply against the payloads its reply may take, strictly:
a field the schema does not list is a problem too (the document says every field a reply
carries; new fields must be declared in the slice's reply Struct). An error reply must come
with the nats.micro error headers, and only an error reply or an `overloaded` refusal (which
carries them so standard NATS tooling counts the shed request) may.

The suite-wide hook in the root conftest records what the slice service sends and what the
public Python API returns, and checks it all at the end of the session.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import msgspec

from workers.service.slices import ERROR_CODE_HEADER, ERROR_HEADER
from workers.tools.asyncapi import build_document, reply_operations

_decoder = msgspec.json.Decoder()

VENDORED = Path(__file__).parent / "asyncapi"
#: The official AsyncAPI 3.0.0 JSON Schema (from the npm package @asyncapi/specs, see SOURCE.md).
ASYNCAPI_SCHEMA = VENDORED / "asyncapi-3.0.0.schema.json"


@cache
def asyncapi_schema() -> dict[str, Any]:
    return json.loads(ASYNCAPI_SCHEMA.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def strict(schemas: Mapping[str, Any]) -> dict[str, Any]:
    """The component schemas with every listed-properties object closed to other fields."""

    def close(value: Any) -> Any:
        if isinstance(value, list):
            return [close(v) for v in value]
        if not isinstance(value, dict):
            return value
        out = {k: close(v) for k, v in value.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out

    return {name: close(schema) for name, schema in schemas.items()}


class ReplyAudit:
    """Checks replies against the reply schemas of `document`."""

    def __init__(self, document: dict[str, Any]) -> None:
        components = {"schemas": strict(document["components"]["schemas"])}
        self._components = components
        self._exact: dict[str, jsonschema.Draft7Validator] = {}
        self._patterns: list[tuple[re.Pattern[str], jsonschema.Draft7Validator]] = []
        for op in reply_operations(document).values():
            validator = jsonschema.Draft7Validator(
                {"anyOf": copy.deepcopy(op["payloads"]), "components": components}
            )
            address: str = op["address"]
            if "{" in address:
                pattern = re.escape(address).replace(r"\{", "{").replace(r"\}", "}")
                pattern = re.sub(r"\{[^}]+\}", r"[^.]+", pattern)
                self._patterns.append((re.compile(f"^{pattern}$"), validator))
            else:
                self._exact[address] = validator

    def covers(self, subject: str) -> bool:
        return self._validator(subject) is not None

    def problems(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> list[str]:
        """What is wrong with `data` as a reply on `subject` (empty when it conforms)."""
        validator = self._validator(subject)
        if validator is None:
            return [f"{subject}: no reply schema in the AsyncAPI document"]
        try:
            reply = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            return [f"{subject}: reply is not JSON ({exc}): {data[:200]!r}"]
        found = []
        errors = list(validator.iter_errors(reply))
        if errors:
            found.append(f"{subject}: reply {_clip(data)} matches none of its published shapes: "
                         + "; ".join(_explain(e) for e in errors))
        if headers is not None:
            refused = isinstance(reply, dict) and reply.get("ok") is False
            is_error = refused and "error" in reply
            shed = refused and reply.get("reason") == "overloaded"
            has_headers = ERROR_HEADER in headers and ERROR_CODE_HEADER in headers
            if (is_error or shed) and not has_headers:
                found.append(f"{subject}: error reply without the nats.micro error headers "
                             f"{dict(headers)}: {_clip(data)}")
            elif has_headers and not (is_error or shed):
                found.append(f"{subject}: nats.micro error headers on a reply that is not an "
                             f"error {dict(headers)}: {_clip(data)}")
        return found

    def matching(self, subject: str, data: bytes) -> list[str]:
        """The titles of the published shapes `data` matches as a reply on `subject`."""
        validator = self._validator(subject)
        assert validator is not None, subject
        reply = _decoder.decode(data)
        found = []
        for payload in validator.schema["anyOf"]:
            one = jsonschema.Draft7Validator({**payload, "components": self._components})
            if one.is_valid(reply):
                found.append(payload["$ref"].rsplit("/", 1)[-1])
        return found

    def _validator(self, subject: str) -> jsonschema.Draft7Validator | None:
        found = self._exact.get(subject)
        if found is not None:
            return found
        for pattern, validator in self._patterns:
            if pattern.match(subject):
                return validator
        return None


@cache
def current_audit() -> ReplyAudit:
    """The audit of the document the code generates now."""
    return ReplyAudit(build_document())


def _explain(error: jsonschema.ValidationError) -> str:
    branches = error.context or []
    if not branches:
        return error.message
    # For each published shape, its first complaint: enough to see which field is off.
    by_shape: dict[int, str] = {}
    for sub in branches:
        shape = sub.schema_path[0] if sub.schema_path else -1
        if isinstance(shape, int) and shape not in by_shape:
            where = "/".join(str(p) for p in sub.absolute_path) or "(top)"
            by_shape[shape] = f"[{where}] {sub.message}"
    return " | ".join(f"shape {k}: {v}" for k, v in sorted(by_shape.items()))


def _clip(data: bytes, limit: int = 300) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "..."
