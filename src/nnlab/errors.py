"""User-facing errors.

Every error a user can cause (bad file, wrong shape, unknown option, diverged run) is raised as a
subclass of :class:`NnlabError` whose message names the problem *and* the fix. The CLI prints such
errors as one line, without a traceback; anything else is a bug and keeps its traceback.
"""


class NnlabError(Exception):
    """Base class of errors caused by input, configuration or data, not by a bug in nnlab."""


class DataError(NnlabError):
    """A data set is missing, corrupt or in an unexpected layout."""


class ConfigError(NnlabError):
    """An option or configuration value is unknown or out of range."""


class CheckpointError(NnlabError):
    """A checkpoint or run folder is missing, corrupt or incompatible."""


class DivergenceError(NnlabError):
    """Training produced a NaN or infinite loss."""
