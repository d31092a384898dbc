"""The one exception type that means "the user asked for something impossible".

The CLI prints a ``UserError`` as a single line on stderr and exits non-zero; any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad config value, a missing file or another mistake the user can fix.

    The message must be one line that names the cause and the config key or file.
    """
