"""Builtin consent providers: safe, local, no network."""
