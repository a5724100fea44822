"""Real providers for the accepted lane's slices; wired at runtime by workers/service/bootstrap.py.

Nothing under `lukhas/` imports this package (an import-linter contract enforces it).
"""
