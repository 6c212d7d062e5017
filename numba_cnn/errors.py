"""The one exception family the CLI turns into a one-line message and a non-zero exit."""


class NumbaCNNError(Exception):
    """A problem the user can fix (bad file, bad flag, missing dependency); its message says how."""


class DataError(NumbaCNNError):
    """A data set that is missing, corrupt, truncated or inconsistent; the message names the file."""


class CheckpointError(NumbaCNNError):
    """A checkpoint that is missing, corrupt, or from a different model."""
