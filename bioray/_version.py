"""bioray's version: said once, here (pyproject.toml reads it; checkpoints record it)."""

__version__ = "0.2.0"
