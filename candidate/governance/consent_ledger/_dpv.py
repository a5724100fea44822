"""The consent model: W3C DPV consent status events and the transitions allowed between them.

Pure functions, no I/O. A record's `event` is what happened; the state of a (subject, purpose)
is its latest record's event, with `given`/`renewed` turning into `expired` once the record's
validity (`expires_at`) has passed. `status` reports the DPV term beside the older vocabulary
`granted | revoked | expired | none`.
"""

from __future__ import annotations

#: event -> (action of the older wire vocabulary, DPV term)
EVENTS: dict[str, tuple[str, str]] = {
    "given": ("grant", "dpv:ConsentGiven"),
    "renewed": ("grant", "dpv:RenewedConsentGiven"),
    "refused": ("refuse", "dpv:ConsentRefused"),
    "withdrawn": ("revoke", "dpv:ConsentWithdrawn"),
    "revoked": ("revoke", "dpv:ConsentRevoked"),
}
EXPIRED = "dpv:ConsentExpired"
UNKNOWN = "dpv:ConsentUnknown"
#: Events a `record` request may carry; `revoke` makes withdrawn (by the data subject) or
#: revoked (by the controller or another party).
RECORD_EVENTS = ("given", "refused", "renewed")
REVOKE_BY = {"subject": "withdrawn", "controller": "revoked", "other": "revoked"}


def event_of(record: dict[str, object]) -> str:
    """The DPV event of a stored record (records from before events: from `action`)."""
    event = record.get("event")
    if isinstance(event, str) and event in EVENTS:
        return event
    return "withdrawn" if record.get("action") == "revoke" else "given"


def status_of(event: str | None, *, expired: bool) -> tuple[str, str]:
    """(older status, DPV term) of a scope whose latest event is `event` (None: no record)."""
    if event is None:
        return "none", UNKNOWN
    if event in ("given", "renewed"):
        return ("expired", EXPIRED) if expired else ("granted", EVENTS[event][1])
    # A refusal is reported as "revoked" in the older vocabulary: no consent to rely on.
    return "revoked", EVENTS[event][1]


def refusal(event: str, current: str | None, *, expired: bool) -> tuple[str, str] | None:
    """(reason, message) if `event` may not follow the scope's latest event `current`."""
    if event == "renewed" and current not in ("given", "renewed"):
        return ("not_given", "renewing needs consent that was given (and not withdrawn, "
                "revoked or refused since); record a new `given` instead")
    if event in ("withdrawn", "revoked") and current is None:
        return "not_granted", "this scope was never granted; there is nothing to revoke"
    if event == "refused" and current in ("given", "renewed") and not expired:
        return ("already_given", "consent for this scope is given; withdraw it (revoke) "
                "instead of refusing")
    return None
