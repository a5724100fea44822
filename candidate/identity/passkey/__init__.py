"""Passkey providers: WebAuthn on py_webauthn and JetStream KV, and a deterministic mock."""
