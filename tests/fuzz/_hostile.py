"""Hostile request bodies for every slice subject: hypothesis strategies and seeded raw bytes.

Both sources are deterministic: the strategies run derandomized, the raw generator is a
`random.Random` with a fixed seed. Bodies aim at the edges a JSON service over NATS meets:
wrong types, huge strings, deep nesting, invalid UTF-8 and lone surrogates, invalid
base64url, subject wildcards where a subject token is built, oversize bodies, random bytes.
"""

from __future__ import annotations

import base64
import json
import random
from typing import Any

from hypothesis import strategies as st

from lukhas import subjects

# -- the reply contract -------------------------------------------------------------------

#: Error codes bad input may produce; `internal` means an unexpected exception, a bug.
INPUT_ERROR_CODES = frozenset({"invalid_request", "payload_too_large"})


def classify_reply(data: bytes) -> str:
    """Check that `data` is a well-formed reply; return `ok`, `refused:<reason>` or the code.

    Raises:
        AssertionError: not JSON, no boolean `ok`, an error without a code and message, a
            traceback on the wire, or an error code that is not about the input.
    """
    text = data.decode("utf-8")
    assert "Traceback" not in text, text[:500]
    reply = json.loads(text)
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), text[:500]
    if reply["ok"]:
        return "ok"
    if "error" in reply:
        error = reply["error"]
        assert isinstance(error, dict) and set(error) == {"code", "message"}, text[:500]
        assert isinstance(error["message"], str) and error["message"], text[:500]
        assert error["code"] in INPUT_ERROR_CODES, text[:500]
        return str(error["code"])
    assert isinstance(reply.get("reason"), str) and reply["reason"], text[:500]
    return f"refused:{reply['reason']}"


# -- building blocks ----------------------------------------------------------------------

#: Strings that are subject syntax, not data.
SUBJECT_TOKENS = [
    "*", ">", "a.*", "a.>", ".", "..", "a..b", " ", "a b", "\t", "\r\n", "$SRV.PING",
    "_INBOX.x", "lukhas.context.>", "matriz.>", "\u0000", "a\u0000b", "ü", "\u202e",
]
#: base64url that is not: wrong alphabet, bad padding, whitespace, non-ASCII.
BAD_BASE64 = ["!!!", "a=b", "====", "ab$cd", "a b", "+/+/", "YQ===", "é", "\n", "A" * 5, "="]
LONE_SURROGATES = ["\ud800", "\udfff", "a\udc00b", "\ud83d"]
VALID_SCOPES = ["gmail.read", "calendar:write", "fuzz/scope-1", "a"]

PASSKEY_FIELDS = ("id", "rawId", "type", "response", "authenticatorAttachment",
                  "clientExtensionResults", "challenge")
ASSERTION_RESPONSE_FIELDS = ("clientDataJSON", "authenticatorData", "signature", "userHandle")
ATTESTATION_RESPONSE_FIELDS = ("clientDataJSON", "attestationObject", "transports")

#: The fields each subject's body has (the names a client would send).
FIELDS: dict[str, tuple[str, ...]] = {
    subjects.CONSENT_RECORD: ("user_id", "scope", "metadata", "idempotency_key"),
    subjects.CONSENT_REVOKE: ("user_id", "scope", "idempotency_key"),
    subjects.CONSENT_STATUS: ("user_id", "scope"),
    subjects.CONSENT_HISTORY: ("user_id",),
    subjects.CONSENT_VERIFY: ("user_id",),
    subjects.PASSKEY_VERIFY: PASSKEY_FIELDS,
    subjects.PASSKEY_REGISTER_OPTIONS: ("user_id", "user_name"),
    subjects.PASSKEY_REGISTER_VERIFY: ("user_id", "credential"),
    subjects.PASSKEY_CHALLENGE: ("user_id",),
    subjects.CONTEXT_HANDOFF: ("ctx", "target", "source"),
}
REQUEST_SUBJECTS = tuple(FIELDS)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _scope_safe(text: str) -> bool:
    # The suite's MATRIZ audit flags "usr_" anywhere in a node, and a valid scope goes
    # into the node's consent_scopes; raw user ids in the tests all start with "usr_".
    return "usr_" not in text


# -- hypothesis strategies ----------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
hostile_strings = (
    st.sampled_from(SUBJECT_TOKENS + BAD_BASE64 + LONE_SURROGATES + VALID_SCOPES)
    | st.text(max_size=64)
    | st.text(alphabet="._-*>: $", max_size=8)
    | st.integers(min_value=0, max_value=40_000).map(lambda n: "x" * n)  # over every limit
    | st.binary(max_size=48).map(_b64)  # valid base64url of random bytes
)
# Any JSON value, but strings (the type most fields want) twice as often.
hostile_values = hostile_strings | hostile_strings | json_values
nested = st.integers(min_value=1, max_value=5000).flatmap(
    lambda depth: st.sampled_from(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
)


@st.composite
def hostile_body(draw: st.DrawFn, subject: str) -> bytes:
    """One request body for `subject`: mostly its own fields with hostile values."""
    kind = draw(st.sampled_from(["fields", "fields", "fields", "any_json", "nested", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    if kind == "nested":
        inner = draw(nested)
        field = draw(st.sampled_from(FIELDS[subject]))
        return f'{{"{field}":{inner}}}'.encode()
    if kind == "any_json":
        value: Any = draw(json_values)
    else:
        value = {}
        for field in FIELDS[subject]:
            if draw(st.booleans()):
                value[field] = draw(hostile_values)
        if draw(st.integers(0, 4)) == 0:
            value[draw(st.text(max_size=12))] = draw(json_values)  # an unknown field
        scope = value.get("scope")
        if isinstance(scope, str) and not _scope_safe(scope):
            value["scope"] = "fuzz"
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8


# -- seeded raw bytes ---------------------------------------------------------------------


def _valid_body(subject: str, rng: random.Random) -> dict[str, Any]:
    """A body that is (nearly) valid for `subject`, to mutate."""
    uid = f"usr_fuzz_{rng.randrange(10**6)}"
    if subject in (subjects.CONSENT_RECORD, subjects.CONSENT_REVOKE, subjects.CONSENT_STATUS):
        body: dict[str, Any] = {"user_id": uid, "scope": rng.choice(VALID_SCOPES)}
        if subject == subjects.CONSENT_RECORD:
            body["metadata"] = {"source": "fuzz", "n": rng.randrange(100)}
        return body
    if subject == subjects.PASSKEY_VERIFY:
        return {
            "id": _b64(rng.randbytes(16)), "rawId": _b64(rng.randbytes(16)), "type": "public-key",
            "response": {
                "clientDataJSON": _b64(b'{"type":"webauthn.get","challenge":"x"}'),
                "authenticatorData": _b64(rng.randbytes(37)),
                "signature": _b64(rng.randbytes(64)),
            },
            "challenge": "c",
        }
    if subject == subjects.PASSKEY_REGISTER_VERIFY:
        return {"user_id": uid, "credential": {
            "id": _b64(rng.randbytes(16)), "rawId": _b64(rng.randbytes(16)), "type": "public-key",
            "response": {"clientDataJSON": _b64(b"{}"), "attestationObject": _b64(b"\xa0")},
        }}
    if subject == subjects.CONTEXT_HANDOFF:
        return {"ctx": {"k": "v", "n": rng.randrange(100)}, "target": "planner"}
    return {"user_id": uid}


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == 1:
            out[pos:pos] = rng.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b'"', b"{", b"\\",
                                       b"\x00", b"]", b",", b"\\u", b"1e999999"])
        elif op == 2 and out:
            del out[pos:pos + rng.randint(1, 8)]
        else:
            out = out[:pos]
    return bytes(out)


def _replace_field(body: dict[str, Any], rng: random.Random, value: Any) -> dict[str, Any]:
    if body:
        body[rng.choice(sorted(body))] = value
    return body


def raw_body(subject: str, rng: random.Random, max_bytes: int) -> bytes:
    """One hostile body for `subject`; `max_bytes` is the slice's own limit."""
    kind = rng.randrange(12)
    valid = _valid_body(subject, rng)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 2048))
    if kind == 1:
        return _mutate(json.dumps(valid).encode(), rng)
    if kind == 2:  # invalid UTF-8 inside a string value
        text = json.dumps(_replace_field(valid, rng, "@@"))
        return text.encode().replace(b"@@", rng.choice([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80",
                                                         b"\xf8\x88\x80\x80\x80"]))
    if kind == 3:  # deep nesting, within the size limit
        depth = rng.randrange(100, max(101, min(max_bytes // 6, 20_000)))
        inner = rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "0" + "}" * depth])
        field = rng.choice(FIELDS[subject])
        return f'{{"{field}":{inner}}}'.encode()[:max_bytes]
    if kind == 4:  # oversize: just over the limit, or far over it
        size = rng.choice([max_bytes + 1, max_bytes + rng.randrange(2, 4096),
                           min(1_000_000, max_bytes * rng.randrange(2, 16))])
        if rng.random() < 0.5:
            pad = "x" * size
            return json.dumps(_replace_field(valid, rng, pad)).encode()[: size + 64]
        return (b"{" * size)[:size]
    if kind == 5:  # a huge string under the limit
        return json.dumps(_replace_field(valid, rng, "y" * rng.randrange(max_bytes // 2))).encode()
    if kind == 6:  # wildcards and subject syntax where a subject token is built
        return json.dumps(_replace_field(valid, rng, rng.choice(SUBJECT_TOKENS))).encode()
    if kind == 7:  # invalid base64url in a WebAuthn field
        response = valid.get("response") or valid.get("credential", {}).get("response")
        target = response if isinstance(response, dict) and rng.random() < 0.7 else valid
        _replace_field(target, rng, rng.choice(BAD_BASE64))
        return json.dumps(valid).encode()
    if kind == 8:  # wrong types
        wrong = rng.choice([None, True, 0, -1, 2**80, 1.5, [], {}, [1, "a"], {"$": None}, ""])
        return json.dumps(_replace_field(valid, rng, wrong)).encode()
    if kind == 9:  # not an object at all
        return rng.choice([b"[]", b"null", b"true", b"0", b'"str"', b"1e400", b"-", b"{}",
                           b"{,}", b'{"a":}', b"\xef\xbb\xbf{}", b" " * 100, b"{" * 3])
    if kind == 10:  # lone surrogates, escaped in the JSON text
        return json.dumps(_replace_field(valid, rng, rng.choice(LONE_SURROGATES))).encode()
    # numbers JSON allows but nobody expects
    text = json.dumps(_replace_field(valid, rng, "@@"))
    return text.replace('"@@"', rng.choice(["1e400", "-0", "123456789012345678901234567890",
                                            "0.0000000000000000000001", "1E+2"])).encode()


def raw_bodies(seed: int, per_subject: int, limits: dict[str, int]) -> list[tuple[str, bytes]]:
    """`per_subject` raw hostile bodies for every request subject, in a seeded order."""
    rng = random.Random(seed)
    out = [
        (subject, raw_body(subject, rng, limits[subject]))
        for subject in REQUEST_SUBJECTS
        for _ in range(per_subject)
    ]
    rng.shuffle(out)
    return out


def hostile_headers(rng: random.Random) -> dict[str, str] | None:
    """Mostly none; sometimes a traceparent that is not one."""
    if rng.random() < 0.8:
        return None
    return {"traceparent": rng.choice([
        "", "00", "zz-" + "0" * 32 + "-" + "0" * 16 + "-01",
        "00-" + "0" * 32 + "-" + "0" * 16 + "-01",
        "00-" + "f" * 32 + "-" + "f" * 16 + "-ff", "x" * 512, "00-usr_secret-00-00",
    ])}
