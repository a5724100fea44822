"""Everything above the slices, in three layers (an import-linter contract keeps them apart):

- `workers.service`: the long-running service (slice service, observability worker,
  discovery, runtime wiring, streams, the `lukhas up` stack);
- `workers.tools`: tooling run against the service (benchmark, load generator, the gate);
- `workers.cli`: the `lukhas` command and its client commands.
"""
