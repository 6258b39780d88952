"""Errors that mean "the input is wrong", reported to the user as one line (no traceback)."""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and the valid set."""


class DataError(ConfigError):
    """Unreadable or malformed training data; the message names the shard URL and the sample key."""
