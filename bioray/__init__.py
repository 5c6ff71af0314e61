"""bioray: instruction-tune LLMs for biomedical NLP on Ray (Rohanian et al., 2024)."""

from bioray._version import __version__
from bioray.config import Config, load as load_config
from bioray.errors import BiorayError, CheckpointError, ConfigError, DataError

__all__ = ["__version__", "BiorayError", "CheckpointError", "Config", "ConfigError", "DataError", "load_config"]
