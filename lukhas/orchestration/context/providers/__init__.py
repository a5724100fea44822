"""Builtin handoff delivery: core NATS publishes confirmed by a group flush."""
