"""Tooling run against the service: the benchmark, the load generator, the acceptance gate."""
