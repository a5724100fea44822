"""The `lukhas` command (`main.py`) and its client commands (request, matriz, health, demo)."""
