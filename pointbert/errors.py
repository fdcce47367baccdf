"""User-facing errors: the command line prints these as one line on stderr, without a traceback."""


class PointBERTError(Exception):
    """A problem with the user's input (a file, a checkpoint, a setting), not a bug."""


class DataError(PointBERTError):
    """A data file or dataset folder is missing, unreadable or malformed. The message names the file."""


class CheckpointError(PointBERTError):
    """A checkpoint is missing, of the wrong kind, or not loadable safely."""
