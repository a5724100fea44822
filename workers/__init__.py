"""Long-running processes: the slice service, the observability worker, runtime wiring."""
