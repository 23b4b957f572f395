"""The one exception the checkpoint readers raise for a file they refuse."""


class CheckpointError(ValueError):
    """A checkpoint that is malformed, truncated, inconsistent or unsafe; the
    message names the file and what is wrong with it."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for a global (class or function) outside the allowlist."""
