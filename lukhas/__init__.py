"""LUKHAS accepted lane: the promoted capability slices."""

__version__ = "0.1.0"
