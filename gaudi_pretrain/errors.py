"""Errors that mean "the user's input is wrong": the CLI prints them as one line and exits 2."""


class GaudiPretrainError(Exception):
    """Base class: a clear, one-line problem with the user's input or environment."""


class ConfigError(GaudiPretrainError):
    """Unknown key, wrong type or inconsistent values in a run configuration."""


class DataError(GaudiPretrainError):
    """Missing shards, empty globs, refused URLs, unreadable inputs."""


class CheckpointError(GaudiPretrainError):
    """Missing, partial or incompatible checkpoints and weight files."""


class TrainingError(GaudiPretrainError):
    """The run cannot continue (e.g. too many consecutive non-finite steps)."""


class PathError(GaudiPretrainError):
    """A path that would leave the directory it belongs to (`..`, absolute names in files or data)."""
