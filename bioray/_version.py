"""bioray's version, said once in a leaf module: pyproject.toml reads it, checkpoints record it and
readers compare against it."""

__version__ = "0.2.0"
