"""Every subject name the service uses, in one place (the public wire contract)."""

from __future__ import annotations

CONSENT_RECORD = "lukhas.governance.consent.record"
CONSENT_REVOKE = "lukhas.governance.consent.revoke"
CONSENT_STATUS = "lukhas.governance.consent.status"
CONSENT_HISTORY = "lukhas.governance.consent.history"
CONSENT_VERIFY = "lukhas.governance.consent.verify"
CONSENT_CHECKPOINT = "lukhas.governance.consent.checkpoint"
CONSENT_PROOF = "lukhas.governance.consent.proof"
CONSENT_ERASE = "lukhas.governance.consent.erase"
CONSENT_RECEIPT = "lukhas.governance.consent.receipt"
#: The ledger also announces each signed checkpoint on CONSENT_CHECKPOINT: the note itself
#: (text/plain), no reply subject, this header giving its tree size. Requests on the same
#: subject always have a reply subject (the endpoint is read-only: the service ignores the
#: announcements). The header is no authentication: verify the note with the ledger's key.
CHECKPOINT_HEADER = "Lukhas-Checkpoint"

PASSKEY_VERIFY = "lukhas.identity.passkey.verify"
PASSKEY_REGISTER_OPTIONS = "lukhas.identity.passkey.register.options"
PASSKEY_REGISTER_VERIFY = "lukhas.identity.passkey.register.verify"
PASSKEY_CHALLENGE = "lukhas.identity.passkey.challenge"
PASSKEY_LIST = "lukhas.identity.passkey.list"
PASSKEY_DELETE = "lukhas.identity.passkey.delete"

CONTEXT_HANDOFF = "lukhas.orchestration.context.handoff"
#: Handoffs are delivered on `lukhas.context.<target>`.
CONTEXT_TARGET_PREFIX = "lukhas.context"

MATRIZ_PREFIX = "matriz"
MATRIZ_ALL = "matriz.>"
#: Emitters publish their dropped-node counters here, one message per flush that dropped.
MATRIZ_DROPS = "lukhas.observability.matriz.drops"

OBSERVABILITY_STATS = "lukhas.observability.stats"
ALERTS_PREFIX = "lukhas.observability.alerts"
#: Each observability worker publishes its mergeable aggregate on `<prefix>.<worker id>`.
OBSERVABILITY_STATE_PREFIX = "lukhas.observability.state"
OBSERVABILITY_STATE_ALL = "lukhas.observability.state.*"
#: The stats reply pushed by the leading observability worker every check interval.
OBSERVABILITY_SNAPSHOT = "lukhas.observability.snapshot"
#: Summaries of the MATRIZ nodes just seen (pseudonyms only), batched, for live views.
OBSERVABILITY_NODES = "lukhas.observability.nodes"
ALERTS_ALL = "lukhas.observability.alerts.>"

#: The observability worker's order to stop a slice's canary (every slice worker hears it):
#: `{"slice", "flag", "variable", "emit_point", "reason", "message", "sla_p95_ms",
#: "canary": {arm stats}, "baseline": {arm stats}, "ts", "worker_id"}` (README, "Canary runs").
CANARY_ROLLBACK = "lukhas.control.canary.rollback"

#: Queue group every slice worker joins, so N workers split the load.
SLICE_QUEUE_GROUP = "lukhas-slices"
SERVICE_NAME = "lukhas-slices"


def context_target(target: str) -> str:
    """The subject a handoff to `target` is published on."""
    return f"{CONTEXT_TARGET_PREFIX}.{target}"


def matriz_subject(node_type: str, label: str) -> str:
    """`matriz.<TYPE>.<label tokens>`: a label `governance:record` gives `governance.record`."""
    tokens = [t for t in label.replace(":", ".").split(".") if t]
    return ".".join([MATRIZ_PREFIX, node_type, *tokens])


def alert_subject(emit_point: str) -> str:
    """`lukhas.observability.alerts.<emit point tokens>` for `TYPE:area:name`."""
    tokens = [t for t in emit_point.replace(":", ".").split(".") if t]
    return ".".join([ALERTS_PREFIX, *tokens])
