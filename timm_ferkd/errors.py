"""Exceptions raised for bad user input.

Every error a user can cause (a bank that does not match the dataset, a corrupt shard, an
impossible flag value) is one of these. The command line prints the message as one line and
exits with status 2, so each message says what is wrong and how to fix it.
"""

__all__ = ['FerKDError', 'BankError', 'BankMismatchError', 'ConfigError', 'HubError']


class FerKDError(Exception):
    """Base class of the errors that the command line reports as one line, exit code 2."""


class ConfigError(FerKDError, ValueError):
    """An option value that cannot work (regions < 1, k > num_classes, thresholds out of order)."""


class BankError(FerKDError):
    """A soft-label bank that cannot be read: missing files, corrupt or truncated shards, unknown version."""


class BankMismatchError(BankError):
    """A bank that is valid on its own but belongs to another dataset, split or class count."""


class HubError(FerKDError):
    """A Hugging Face Hub bank name that cannot be resolved (unknown repo or revision, offline, not a bank)."""
