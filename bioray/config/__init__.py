"""bioray's one config schema: typed dataclasses, YAML files and ``--set`` overrides.

Defaults live in :mod:`~bioray.config.schema` and nowhere else. A config is built as
defaults <- YAML <- ``--set`` (:mod:`~bioray.config.load`), checked once
(:mod:`~bioray.config.validate`: unknown keys, wrong types, bad combinations fail naming the
key), and crosses process boundaries as the plain dict of :func:`to_dict`; the receiver calls
:func:`from_dict`. :mod:`~bioray.config.docs` writes docs/config.md from the schema.

Import from here (``from bioray.config import Config, load``); the modules are the layout.
"""

from bioray.config.docs import reference_markdown
from bioray.config.load import (DATA_ENV, RENAMED, apply_override, config_file, data_root, dump, from_dict, load,
                                packaged_configs, read_yaml, to_dict)
from bioray.config.schema import (Config, CorpusSection, DataSection, EvalSection, LoraSection, MixtureSection,
                                  ModelSection, RunSection, SourceConfig, TinyModelSection, TrainSection,
                                  TuneSection)
from bioray.config.validate import CHAT_TEMPLATE, FORMAT_TASK, FORMATS, SPLITS, TASKS, TUNE_SPACE_KINDS

__all__ = [
    "CHAT_TEMPLATE", "DATA_ENV", "FORMATS", "FORMAT_TASK", "RENAMED", "SPLITS", "TASKS", "TUNE_SPACE_KINDS",
    "Config", "CorpusSection", "DataSection", "EvalSection", "LoraSection", "MixtureSection", "ModelSection",
    "RunSection", "SourceConfig", "TinyModelSection", "TrainSection", "TuneSection",
    "apply_override", "config_file", "data_root", "dump", "from_dict", "load", "packaged_configs", "read_yaml",
    "reference_markdown", "to_dict",
]
