"""The HTTP gateway: the passkey page and the live MATRIZ dashboard (see `service.py`)."""
