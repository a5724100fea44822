"""Identity slice: passkey (WebAuthn) verification."""
