"""Errors that mean "the input is wrong", reported to the user as one line (no traceback)."""

import difflib


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and the valid set."""


class DataError(ConfigError):
    """Unreadable or malformed training data; the message names the shard URL and the sample key."""


def did_you_mean(name: str, valid, prefix: str = "") -> str:
    """The hint for a misspelt `name`: "did you mean <prefix>X?" with the closest of `valid`, or "" if none is close."""
    close = difflib.get_close_matches(str(name), sorted(str(v) for v in valid), n=1, cutoff=0.6)
    return f"did you mean {prefix}{close[0]}?" if close else ""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, incompatible, or not plain data); the message names
    the file or directory and what is wrong with it."""


def weights_only_reason(error: Exception) -> str:
    """The line of a torch.load(weights_only=True) refusal that says what the file asked for."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "WeightsUnpickler error:" in line or "GLOBAL" in line]
    reason = (named or lines or [""])[0]
    return reason.split("WeightsUnpickler error:")[-1].strip()
