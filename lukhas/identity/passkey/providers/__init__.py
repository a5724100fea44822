"""Builtin passkey providers: safe, local, no network."""
