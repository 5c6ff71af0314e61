"""bioray's version, in a leaf module: checkpoints record it and readers compare against it."""

__version__ = "0.1.0"
