"""Governance slice: the consent ledger."""
