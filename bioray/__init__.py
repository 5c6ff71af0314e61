"""bioray: instruction-tune LLMs for biomedical NLP on Ray (Rohanian et al., 2024)."""

from bioray.config import Config, load as load_config
from bioray.errors import BiorayError, CheckpointError, ConfigError, DataError

__all__ = ["BiorayError", "CheckpointError", "Config", "ConfigError", "DataError", "load_config"]
__version__ = "0.1.0"
