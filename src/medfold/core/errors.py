"""Errors a user can act on. Each message names the file, the config key and what was expected."""


class MedfoldError(Exception):
    """Base class: caught at the script boundary and printed without a traceback."""


class ConfigError(MedfoldError):
    """The config (or a file it points at) does not fit what the step needs."""


class DataError(MedfoldError):
    """The data itself cannot be used as asked (empty fold, missing class, NaN loss...)."""


class LeakageError(MedfoldError):
    """A patient or a duplicate image appears in more than one set. ``crossing``: the images
    that cross, by their real IDs (for the data's owner; never for a shared output)."""

    def __init__(self, message: str, crossing=None):
        super().__init__(message)
        self.crossing = crossing
