"""The one exception family the CLI turns into a one-line message and a non-zero exit."""


class NumbaCNNError(Exception):
    """A problem the user can fix (bad file, bad flag, missing dependency); its message says how."""


class DataError(NumbaCNNError):
    """A data set that is missing, corrupt, truncated or inconsistent; the message names the file."""


class CheckpointError(NumbaCNNError):
    """A checkpoint that is missing, corrupt, or from a different model."""


def check_int_flag(name, value, least=1, optional=False):
    """The one check of an integer setting: `value` must be an int >= least (None too when optional); the error
    names the flag as the user typed it (batch_size -> --batch-size)."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        want = "a positive integer" if least == 1 else f"an integer of at least {least}"
        raise NumbaCNNError(f"--{name.replace('_', '-')} must be {want}, got {value!r}")
    return value
