"""Subject and header rules shared by every backend, so both refuse the same input.

The rules are NATS's (https://docs.nats.io/nats-concepts/subjects): tokens separated by
`.`, no empty tokens, no whitespace; `*` matches exactly one token and `>` one or more
trailing tokens. We are stricter than the server in one place: a `*` or `>` inside a
longer token ("a*b") is refused everywhere, as nats-py refuses it on subscribe.
"""

from __future__ import annotations

import re

from bus._types import Headers
from bus.errors import InvalidHeader, InvalidSubject

_WHITESPACE = re.compile(r"\s")
# RFC 7230 token characters: what nats-py accepts as a header name.
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Values cannot carry line breaks on the wire; nats-py turns them into spaces.
_HEADER_VALUE_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def _tokens(subject: str) -> list[str]:
    if not subject:
        raise InvalidSubject(subject, "empty")
    if _WHITESPACE.search(subject):
        raise InvalidSubject(subject, "contains whitespace")
    tokens = subject.split(".")
    if "" in tokens:
        raise InvalidSubject(subject, "empty token")
    return tokens


def validate_subject(subject: str) -> None:
    """Check a subject to publish or reply to: literal tokens only.

    Raises:
        InvalidSubject: empty, whitespace, empty tokens, or any wildcard.
    """
    # The common case in one pass of string methods, no regex: printable with no space means
    # no whitespace (every `str.isspace()` character but the space is unprintable).
    if (subject and subject.isprintable() and " " not in subject and "*" not in subject
            and ">" not in subject and ".." not in subject and subject[0] != "."
            and subject[-1] != "."):
        return
    for token in _tokens(subject):
        if "*" in token or ">" in token:
            raise InvalidSubject(subject, "wildcards are not allowed when publishing")


def validate_pattern(pattern: str) -> tuple[str, ...]:
    """Check a subscription subject and return its tokens.

    Raises:
        InvalidSubject: empty, whitespace, empty tokens, or a misplaced wildcard.
    """
    tokens = _tokens(pattern)
    last = len(tokens) - 1
    for index, token in enumerate(tokens):
        if token == ">":
            if index != last:
                raise InvalidSubject(pattern, "'>' must be the last token")
        elif token != "*" and ("*" in token or ">" in token):
            raise InvalidSubject(pattern, "a wildcard must be a whole token")
    return tuple(tokens)


def validate_queue(queue: str | None) -> None:
    """Check a queue group name (None means no group).

    Raises:
        InvalidSubject: the name is empty or contains whitespace.
    """
    if queue is None:
        return
    if not queue or _WHITESPACE.search(queue):
        raise InvalidSubject(queue, "a queue group name must be non-empty, without whitespace")


def matches(pattern: tuple[str, ...], subject: tuple[str, ...]) -> bool:
    """Tell whether a literal subject (as tokens) matches a subscription pattern."""
    for index, token in enumerate(pattern):
        if token == ">":
            # '>' needs at least one token to swallow: "a.>" does not match "a".
            return len(subject) > index
        if index >= len(subject):
            return False
        if token != "*" and token != subject[index]:
            return False
    return len(pattern) == len(subject)


def normalize_headers(headers: Headers | None) -> dict[str, str]:
    """Return headers as they arrive after a NATS round trip.

    Keys and values are stripped, empty keys skipped and line breaks in values turned
    into spaces, exactly as nats-py encodes them, so the memory bus delivers the same.

    Raises:
        InvalidHeader: a key holds characters a header name cannot have.
    """
    if not headers:
        return {}
    out: dict[str, str] = {}
    for key, value in headers.items():
        name = key.strip()
        if not name:
            continue
        if not _HEADER_KEY.fullmatch(name):
            raise InvalidHeader(key)
        out[name] = value.strip().translate(_HEADER_VALUE_NEWLINES)
    return out


class EncodedHeaders:
    """Headers validated and laid out once, for a message sent again and again (a refusal).

    `mapping` is what `normalize_headers` makes of them; `block` the header block as nats-py
    writes it on the wire (`NATS/1.0`, a `Name: value` line each, a blank line).

    Raises:
        InvalidHeader: a key holds characters a header name cannot have.
    """

    __slots__ = ("block", "mapping")

    def __init__(self, headers: Headers) -> None:
        self.mapping = normalize_headers(headers)
        lines = [f"{name}: {value}\r\n" for name, value in self.mapping.items()]
        self.block = ("NATS/1.0\r\n" + "".join(lines) + "\r\n").encode()
