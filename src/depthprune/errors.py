"""The one exception type the CLI turns into a one-line error message."""


class DepthpruneError(Exception):
    """Bad input or an unsupported situation, stated so a user knows what to change.

    The message is one line: what is wrong and what to do about it. The CLI prints it without a
    traceback and exits with status 2.
    """
