"""Orchestration slice: context handoff over the bus."""
