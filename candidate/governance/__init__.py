"""Governance providers."""
