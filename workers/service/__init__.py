"""The long-running service: slice service, observability worker, discovery, wiring, stack."""
