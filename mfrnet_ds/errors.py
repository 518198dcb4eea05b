"""The failures a user fixes (a setting, an input file), as opposed to bugs: the launchers print their one-line
message as `error: ...` and exit 2."""


class UserError(Exception):
    """A failure the user fixes, not a bug: a setting, or an input file that is missing or not what it should
    be. The message says what and where in one line; launch/train.py and launch/evaluate.py print it as
    `error: <message>` (rank 0 only) and exit 2, without a traceback."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the run needs does not exist (still a FileNotFoundError for callers)."""


class BadFileError(UserError, ValueError):
    """An input file exists but cannot be used: unreadable, malformed, or made for another model."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message names the key."""
