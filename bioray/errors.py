"""Errors that mean "the user's input is wrong": the jobs print one line and exit 2."""


class BiorayError(Exception):
    """Bad config or bad input; the message is one line naming the key, file or line."""


class UsageError(BiorayError):
    """A job's command line is wrong (a missing or unknown argument)."""


class ConfigError(BiorayError):
    """A config key is unknown, has the wrong type or an invalid value."""


class DataError(BiorayError):
    """A corpus or predictions file cannot be used as it is."""


class CheckpointError(BiorayError):
    """A checkpoint folder is incomplete or was made for another base model."""


class OutputError(BiorayError):
    """An output folder exists and would be overwritten."""


class FetchError(BiorayError):
    """A public corpus could not be downloaded, or its checksum does not match."""
