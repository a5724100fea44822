"""The JetStream consent ledger (`jetstream_ledger.JetStreamConsentLedger`)."""
