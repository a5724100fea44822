"""A verifiable log, I/O-free: RFC 6962 Merkle trees, C2SP signed notes, checkpoints and proofs.

Import each thing from the module that owns it (`merkle`, `note`, `checkpoint`, `tlog_proof`,
`record`, `receipt`, `bundle`, `keys`); `README.md` ("Verifiable consent ledger") documents the
formats and how a third party verifies.
"""
